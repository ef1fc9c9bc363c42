// `acme-sts-js`: the Acme STS provider of `plugins/acme-sts`, in JavaScript.
//
// A company STS that is not OAuth2: `POST <sts_url>/sts/session` with `X-Api-Key`
// and a JSON body `{user, audience}` answers `{session, ttl, user}`, or 429 with
// `Retry-After`. Resource servers answer 401 with `WWW-Authenticate: AcmeSession
// error="expired"` (⇒ refresh-and-retry) or `error="revoked"` (⇒ fail: an
// administrator ended the session), and 403 for another audience (⇒ fail).

import {
  provider, config, headers, request, unavailable, denied, misconfigured, key,
  challenge, param, retryAfterMs, refreshAndRetry, retryAfter, fail, refreshOnUnauthorized,
} from 'reauth-provider';

export const authProvider = provider({
  describe: {
    name: 'acme-sts-js',
    version: '0.2.0',
    config: [
      key('sts_url', 'url', { required: true, help: 'the STS base URL' }),
      key('api_key', 'text', { required: true, secret: true, help: 'sent as X-Api-Key' }),
      key('user', 'text', { required: true, help: 'the user sessions are for' }),
      key('audience', 'text', { help: "default audience (a request's wins)" }),
      key('otp_seed', 'text', { secret: true, help: 'sent as X-Acme-Otp' }),
      key('timeout_ms', 'integer', { help: 'timeout towards the STS (ms, default 10000)' }),
    ],
  },
  async getCredentials(req) {
    const url = `${config.required('sts_url').replace(/\/+$/, '')}/sts/session`;
    const body = { user: config.required('user') };
    const audience = req.audience ?? config.get('audience');
    if (audience) body.audience = audience;
    const hdrs = { 'x-api-key': config.required('api_key'), 'content-type': 'application/json' };
    const otp = config.get('otp_seed');
    if (otp) hdrs['x-acme-otp'] = otp;
    const res = await request(url, { method: 'POST', headers: hdrs, body: JSON.stringify(body) });
    if (res.status === 200) {
      const doc = await res.json();
      return headers({ authorization: `AcmeSession ${doc.session}` },
        { expiresIn: Number(doc.ttl), principal: doc.user });
    }
    if (res.status === 429 || res.status >= 500) {
      throw unavailable(`the STS answered HTTP ${res.status}`, retryAfterMs(res));
    }
    if (res.status === 401 || res.status === 403) {
      throw denied(`the STS refused the API key (HTTP ${res.status})`);
    }
    throw misconfigured(`the STS answered HTTP ${res.status}`);
  },
  handleSecurityError(_req, _credentials, error) {
    if (error.retryAfterMs !== undefined && error.retryAfterMs !== null) {
      return retryAfter(error.retryAfterMs);
    }
    const code = param(challenge(error, 'AcmeSession'), 'error');
    if (code === 'expired') return refreshAndRetry();
    if (code === 'revoked' || error.kind === 'forbidden') return fail();
    return refreshOnUnauthorized(error);
  },
});
