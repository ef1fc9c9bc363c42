// A real OpenID Connect provider (panva/oidc-provider 9.x) for reauth's
// integration tests. Loopback only; every client is declared here.
//
//   node idp.mjs --port 0 --keys /tmp/keys.json [--ttl 5] [--client-jwk /tmp/client.jwk.json]
//
// Prints one JSON line `{"issuer": "...", "pid": N}` on stdout once it listens.
// `--keys`: the signing keys are loaded from this file, or generated (RS256) and
// written there, so a restart with the same file keeps the keys and a restart with
// another file rotates them.
// `GET /_stats` (test-only) returns how many token requests each client made, per
// grant type, and the outcome, so tests can bound how often reauth calls the IdP.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { once } from 'node:events';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    keys: { type: 'string' },
    ttl: { type: 'string', default: '5' },
    'client-jwk': { type: 'string' },
  },
});
if (!args.keys) {
  console.error('idp: --keys <file> is required');
  process.exit(2);
}

function signingKeys(path) {
  if (existsSync(path)) return JSON.parse(readFileSync(path, 'utf8'));
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const keys = { keys: [{ ...jwk, kid: randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' }] };
  writeFileSync(path, JSON.stringify(keys), { mode: 0o600 });
  return keys;
}

const ttl = Number(args.ttl);
const API = 'urn:reauth:test-api';

const clients = [
  {
    client_id: 'cc-basic',
    client_secret: 'cc-basic-secret-0123456789',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    scope: 'api:read api:write',
  },
  {
    client_id: 'cc-post',
    client_secret: 'cc-post-secret-0123456789',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'api:read',
  },
  {
    client_id: 'rp',
    client_secret: 'rp-secret-0123456789',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
    token_endpoint_auth_method: 'client_secret_basic',
    scope: 'openid offline_access api:read',
  },
];
if (args['client-jwk']) {
  const jwk = JSON.parse(readFileSync(args['client-jwk'], 'utf8'));
  clients.push({
    client_id: 'cc-jwt',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: jwk.alg ?? 'ES256',
    jwks: { keys: [jwk] },
    scope: 'api:read',
  });
}

const stats = {};
function count(client, grant, status) {
  const key = `${client}|${grant}`;
  stats[key] ??= { client, grant, ok: 0, failed: 0 };
  if (status < 400) stats[key].ok += 1;
  else stats[key].failed += 1;
}

// Listen first: the issuer must carry the real port.
const server = createServer();
server.listen(Number(args.port), '127.0.0.1');
await once(server, 'listening');
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients,
  jwks: signingKeys(args.keys),
  cookies: { keys: [randomBytes(16).toString('hex')] },
  scopes: ['openid', 'offline_access', 'api:read', 'api:write'],
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf ?? API,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resource) => {
        if (resource !== API) throw new errors.InvalidTarget(`unknown resource ${resource}`);
        return {
          scope: 'api:read api:write',
          audience: API,
          accessTokenFormat: 'jwt',
          accessTokenTTL: ttl,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  enabledJWA: { clientAuthSigningAlgValues: ['ES256', 'RS256', 'EdDSA'] },
  ttl: {
    AccessToken: ttl,
    ClientCredentials: ttl,
    IdToken: 3600,
    RefreshToken: 24 * 3600,
    Grant: 24 * 3600,
    Session: 24 * 3600,
    Interaction: 600,
    AuthorizationCode: 60,
  },
  // Every refresh rotates the refresh token; reusing a rotated one revokes the
  // whole grant (oidc-provider's reuse detection), so a client that ever replays
  // an old token is caught by its next refresh failing.
  rotateRefreshToken: true,
  issueRefreshToken: async (_ctx, client, code) =>
    client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id }),
  }),
  pkce: { required: () => false },
});

provider.use(async (ctx, next) => {
  if (ctx.path === '/_stats' && ctx.method === 'GET') {
    ctx.body = Object.values(stats);
    return;
  }
  await next();
  if (ctx.path === '/token' && ctx.method === 'POST') {
    const client = ctx.oidc?.client?.clientId ?? ctx.oidc?.body?.client_id ?? 'unknown';
    count(client, ctx.oidc?.params?.grant_type ?? 'unknown', ctx.status);
  }
});

server.on('request', provider.callback());
process.stdout.write(`${JSON.stringify({ issuer, pid: process.pid })}\n`);

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
