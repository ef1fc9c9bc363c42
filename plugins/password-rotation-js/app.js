// `password-rotation-js`: a username and password that rotate, read from a
// secrets store over HTTP — the logic of the Rust `password-rotation`, written in
// JavaScript with the reauth JS kit.
//
// Config:
// - `secret_url`: JSON endpoint read at every fetch, interpreted by `format`:
//   - `json` (default): `username_field` / `password_field` (a plain key or a JSON
//     pointer such as `/data/password`; defaults `username` / `password`);
//   - `vault-kv2`: fields under `/data/data/`;
//   - `vault-static-creds`: `/data/username`, `/data/password`, and `/data/ttl`
//     (seconds until Vault rotates the password) as the expiry;
//   - `ttl_field`: a JSON pointer to "seconds until rotation" for other formats;
// - `vault_token` (sent as `X-Vault-Token`) or `secret_token` (a bearer token);
// - `username`: overrides the endpoint's; with `password` and no `secret_url`, a
//   fixed pair.
//
// Errors: 401/403 from the store ⇒ denied; 404 ⇒ misconfigured; 5xx or transport
// ⇒ unavailable. Security errors: unauthorized / token-expired ⇒ refresh-and-retry
// (the password rotated); forbidden ⇒ fail (a new password grants no permission).

import {
  provider, config, basic, request, denied, misconfigured, unavailable, refreshOnUnauthorized,
  key, retryAfterMs,
} from 'reauth-provider';

const FORMATS = {
  json: ['username', 'password', undefined],
  'vault-kv2': ['/data/data/username', '/data/data/password', undefined],
  'vault-static-creds': ['/data/username', '/data/password', '/data/ttl'],
};

function field(doc, selector) {
  if (!selector.startsWith('/')) return doc?.[selector];
  return selector
    .slice(1)
    .split('/')
    .map((part) => part.replace(/~1/g, '/').replace(/~0/g, '~'))
    .reduce((node, key) => (node && typeof node === 'object' ? node[key] : undefined), doc);
}

async function fetchSecret(url) {
  const format = config.get('format', 'json');
  const defaults = FORMATS[format];
  if (!defaults) {
    throw misconfigured(`config key \`format\`: unknown \`${format}\` (use json, vault-kv2 or vault-static-creds)`);
  }
  const headers = { accept: 'application/json' };
  const vaultToken = config.get('vault_token');
  const secretToken = config.get('secret_token');
  if (vaultToken) headers['x-vault-token'] = vaultToken;
  else if (secretToken) headers.authorization = `Bearer ${secretToken}`;
  const res = await request(url, { headers });
  if (res.status === 401 || res.status === 403) throw denied(`secret endpoint refused access (HTTP ${res.status})`);
  if (res.status === 404) throw misconfigured('secret endpoint answered 404: check `secret_url`');
  if (!res.ok) throw unavailable(`secret endpoint answered HTTP ${res.status}`, retryAfterMs(res));
  let doc;
  try {
    doc = await res.json();
  } catch {
    throw unavailable('secret endpoint answered something that is not JSON');
  }
  const passwordField = config.get('password_field', defaults[1]);
  const password = field(doc, passwordField);
  if (typeof password !== 'string') {
    throw misconfigured(`secret endpoint response has no string field \`${passwordField}\``);
  }
  const username = field(doc, config.get('username_field', defaults[0]));
  const ttlField = config.get('ttl_field', defaults[2]);
  let ttl;
  if (ttlField !== undefined) {
    ttl = field(doc, ttlField);
    if (!Number.isInteger(ttl) || ttl < 0) {
      throw misconfigured(`secret endpoint response has no whole-seconds field \`${ttlField}\``);
    }
  }
  return { username: typeof username === 'string' ? username : undefined, password, ttl };
}

export const authProvider = provider({
  describe: {
    name: 'password-rotation-js',
    version: '0.2.0',
    config: [
      key('username', 'text', { help: "fixed username (overrides the endpoint's)" }),
      key('password', 'text', { secret: true, help: 'fixed password (without `secret_url`)' }),
      key('secret_url', 'url', { help: 'JSON endpoint read at every fetch' }),
      key('format', 'text', { help: 'json (default), vault-kv2 or vault-static-creds' }),
      key('username_field', 'text', { help: 'key or JSON pointer of the username' }),
      key('password_field', 'text', { help: 'key or JSON pointer of the password' }),
      key('ttl_field', 'text', { help: 'JSON pointer to seconds until rotation' }),
      key('vault_token', 'text', { secret: true, help: 'sent as X-Vault-Token' }),
      key('secret_token', 'text', { secret: true, help: 'sent as a bearer token' }),
    ],
  },
  async getCredentials() {
    const url = config.get('secret_url');
    const secret = url ? await fetchSecret(url) : { password: config.required('password') };
    const username = config.get('username') ?? secret.username;
    if (!username) throw misconfigured('no `username` in config and none in the secret endpoint response');
    // Vault reports ttl 0 while a rotation is due: keep the password a moment
    // rather than marking it expired on arrival.
    const options = { principal: username };
    if (secret.ttl !== undefined) options.expiresIn = Math.max(secret.ttl, 1);
    return basic(username, secret.password, options);
  },
  handleSecurityError: (_request, _credentials, error) => refreshOnUnauthorized(error),
});
