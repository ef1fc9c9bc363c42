// Scripted login against the test IdP's development interactions, in plain HTTP:
// authorization request → login form → consent form → code → token. Prints the
// token response (with the offline refresh token) as one JSON line.
//
//   node login.mjs <issuer> <account>
//
// The `rp` client is declared in idp.mjs.

const [issuer, account] = process.argv.slice(2);
if (!issuer || !account) {
  console.error('usage: node login.mjs <issuer> <account>');
  process.exit(2);
}
const CLIENT = 'rp';
const SECRET = 'rp-secret-0123456789';
const REDIRECT = 'http://127.0.0.1/callback';

const jar = new Map();
function keep(response) {
  for (const line of response.headers.getSetCookie()) {
    const [pair] = line.split(';');
    const eq = pair.indexOf('=');
    jar.set(pair.slice(0, eq), pair.slice(eq + 1));
  }
}
const cookie = () => [...jar].map(([k, v]) => `${k}=${v}`).join('; ');

async function step(url, init = {}) {
  const response = await fetch(new URL(url, issuer), {
    ...init,
    redirect: 'manual',
    headers: { ...(init.headers ?? {}), cookie: cookie() },
    signal: AbortSignal.timeout(5000),
  });
  keep(response);
  return response;
}

function fail(message) {
  console.error(`login: ${message}`);
  process.exit(1);
}

const authorize = new URL('/auth', issuer);
authorize.search = new URLSearchParams({
  client_id: CLIENT,
  response_type: 'code',
  redirect_uri: REDIRECT,
  scope: 'openid offline_access api:read',
  prompt: 'consent',
  state: 'reauth-test',
}).toString();

let response = await step(authorize);
let code;
for (let hop = 0; hop < 10 && !code; hop += 1) {
  if (response.status < 300 || response.status >= 400) {
    fail(`unexpected HTTP ${response.status} at hop ${hop}: ${(await response.text()).slice(0, 300)}`);
  }
  const location = new URL(response.headers.get('location'), issuer);
  if (location.href.startsWith(REDIRECT)) {
    code = location.searchParams.get('code');
    if (!code) fail(`redirected back without a code: ${location.search}`);
    break;
  }
  if (location.pathname.startsWith('/interaction/')) {
    const page = await step(location);
    const html = await page.text();
    const prompt = /name="prompt" value="([a-z]+)"/.exec(html)?.[1];
    if (!prompt) fail(`no prompt in interaction page: ${html.slice(0, 300)}`);
    const form = new URLSearchParams({ prompt });
    if (prompt === 'login') {
      form.set('login', account);
      form.set('password', 'any');
    }
    response = await step(location, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: form.toString(),
    });
  } else {
    response = await step(location);
  }
}
if (!code) fail('no authorization code after 10 hops');

const token = await fetch(new URL('/token', issuer), {
  method: 'POST',
  headers: {
    authorization: `Basic ${Buffer.from(`${CLIENT}:${SECRET}`).toString('base64')}`,
    'content-type': 'application/x-www-form-urlencoded',
  },
  body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: REDIRECT }).toString(),
  signal: AbortSignal.timeout(5000),
});
const body = await token.json();
if (!token.ok || !body.refresh_token) fail(`token exchange failed: HTTP ${token.status} ${JSON.stringify(body)}`);
process.stdout.write(`${JSON.stringify(body)}\n`);
