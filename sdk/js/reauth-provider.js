// reauth-provider: helpers for reauth providers written in JavaScript
// (componentize-js). Import it as `reauth-provider`; `sdk/js/build.sh` bundles it.
//
//   import { provider, config, bearer, refreshOnUnauthorized } from 'reauth-provider';
//
//   export const authProvider = provider({
//     async getCredentials(request) {
//       const res = await fetch(config.required('token_url'), { method: 'POST', ... });
//       ...
//       return bearer(token, { expiresIn: 3600, principal: 'svc' });
//     },
//     handleSecurityError: (request, credentials, error) => refreshOnUnauthorized(error),
//   });
//
// `fetch` goes through wasi:http, so the host's `allowed_hosts` applies: a request
// elsewhere fails (a TypeError, which `provider` turns into `unavailable`). Time
// (`Date.now()`, `now()`) is the host's clock, virtual under `reauth test`.

import { get as configGet, getAll as configGetAll } from 'wasi:config/store@0.2.0-rc.1';
import * as hostState from 'reauth:provider/state@0.2.0';

/** A provider error: `throw unavailable('...')` (or `denied`, `misconfigured`). */
export class ProviderError extends Error {
  constructor(tag, message, retryAfterMs = undefined) {
    super(message);
    this.name = 'ProviderError';
    /** `unavailable`, `denied` or `misconfigured`. */
    this.tag = tag;
    /** For `unavailable`: the identity provider's `Retry-After`, in ms. */
    this.retryAfterMs = retryAfterMs;
  }
}

/** Transient (IdP down, 5xx, 429, timeout): the host backs off (or waits
 * `retryAfterMs`, the IdP's Retry-After) and keeps serving a still-valid cached
 * credential. */
export const unavailable = (message, retryAfterMs = undefined) =>
  new ProviderError('unavailable', message, retryAfterMs);
/** The IdP refused (bad secret, revoked grant): not retried hot. */
export const denied = (message) => new ProviderError('denied', message);
/** The provider's configuration is wrong or incomplete. */
export const misconfigured = (message) => new ProviderError('misconfigured', message);

/** One config key of the schema `describe` returns: `type` is `text`,
 * `integer`, `boolean` or `url`; options `{required, secret, help}`. */
export function key(name, type = 'text', { required = false, secret = false, help = '' } = {}) {
  if (!['text', 'integer', 'boolean', 'url'].includes(type)) {
    throw new TypeError(`config key ${name}: type must be text, integer, boolean or url`);
  }
  return { name, valueType: type, required, secret, help };
}

/** The first `WWW-Authenticate` challenge of `scheme` (case-insensitive) a
 * security error carries: `{scheme, params: [[name, value]…], token68}`. */
export function challenge(error, scheme) {
  const want = String(scheme).toLowerCase();
  return (error.challenges ?? []).find((c) => c.scheme.toLowerCase() === want);
}

/** Parameter `name` (case-insensitive) of a challenge. */
export function param(c, name) {
  const want = String(name).toLowerCase();
  return c?.params.find(([k]) => k.toLowerCase() === want)?.[1];
}

/** A fetch `Response`'s `Retry-After` in milliseconds (delta-seconds or an HTTP
 * date, relative to the host's clock), if usable. */
export function retryAfterMs(response) {
  const value = (response.headers.get('retry-after') ?? '').trim();
  if (/^[0-9]+$/.test(value)) return Number(value) * 1000;
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}

/** Decisions for `handleSecurityError`. */
export const refreshAndRetry = () => ({ tag: 'refresh-and-retry' });
export const retryAfter = (ms) => ({ tag: 'retry-after', val: BigInt(ms) });
export const fail = () => ({ tag: 'fail' });

/** The usual bearer policy: token-expired / unauthorized ⇒ refresh-and-retry;
 * forbidden (a new token will not grant a missing permission) and other ⇒ fail. */
export function refreshOnUnauthorized(error) {
  return error.kind === 'token-expired' || error.kind === 'unauthorized'
    ? refreshAndRetry()
    : fail();
}

/** The provider's `[providers.<name>.config]` table, via wasi:config. */
export const config = {
  get(key, fallback = undefined) {
    let value;
    try {
      value = configGet(key);
    } catch (e) {
      throw misconfigured(`reading config key \`${key}\`: ${describe(e)}`);
    }
    return value === undefined ? fallback : value;
  },
  /** The value of `key`; a `misconfigured` error naming it when absent. */
  required(key) {
    const value = config.get(key);
    if (value === undefined || value === '') throw misconfigured(`config key \`${key}\` is required`);
    return value;
  },
  all() {
    try {
      return configGetAll();
    } catch (e) {
      throw misconfigured(`reading the config: ${describe(e)}`);
    }
  },
};

/** Small values the host persists atomically across calls and restarts. */
export const state = {
  get: (key) => hostState.get(key),
  /** Stored durably before it returns; `unavailable` if the host could not. */
  set(key, value) {
    try {
      hostState.set(key, value);
    } catch (e) {
      throw unavailable(`could not persist state \`${key}\`: ${describe(e)}`);
    }
  },
  delete(key) {
    try {
      hostState.delete(key);
    } catch (e) {
      throw unavailable(`could not delete state \`${key}\`: ${describe(e)}`);
    }
  },
};

/** Seconds since the Unix epoch, from the host's clock. */
export const now = () => Math.floor(Date.now() / 1000);

function credentials(credential, { expiresIn, expiresAt, principal } = {}) {
  if (expiresIn !== undefined && expiresAt !== undefined) {
    throw new TypeError('give expiresIn or expiresAt, not both');
  }
  let at = expiresAt;
  if (at instanceof Date) at = Math.floor(at.getTime() / 1000);
  if (expiresIn !== undefined) at = now() + Math.floor(Number(expiresIn));
  return {
    credential,
    expiresAt: at === undefined || at === null ? undefined : { seconds: BigInt(at), nanoseconds: 0 },
    principal: principal ?? undefined,
  };
}

/** A bearer token; options `{expiresIn | expiresAt (seconds or Date), principal}`.
 * Without an expiry the host reads a JWT's `exp`. */
export const bearer = (token, options) => credentials({ tag: 'bearer', val: token }, options);
/** A username and password. */
export const basic = (username, password, options) =>
  credentials({ tag: 'basic', val: { username, password } }, options);
/** Arbitrary headers (an object or a list of pairs). */
export const headers = (values, options) =>
  credentials({ tag: 'headers', val: Array.isArray(values) ? values : Object.entries(values) }, options);

/** The claims of a JWT, unverified; undefined if `token` is not a JWT. */
export function jwtClaims(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) return undefined;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))));
    return claims && typeof claims === 'object' ? claims : undefined;
  } catch {
    return undefined;
  }
}

/** A JWT's `exp` (seconds since the epoch), if it has one. */
export function jwtExpiry(token) {
  const exp = jwtClaims(token)?.exp;
  return typeof exp === 'number' ? Math.floor(exp) : undefined;
}

/** `Basic …` for an Authorization header (RFC 6749 §2.3.1 encoding). */
export const basicAuthHeader = (username, password) =>
  'Basic ' + btoa(`${encodeURIComponent(username)}:${encodeURIComponent(password)}`);

/** `fetch` that turns a transport failure or a host denial into `unavailable`
 * naming the URL's host (a network problem is never a refusal). */
export async function request(url, init) {
  try {
    return await fetch(url, init);
  } catch (e) {
    let host = url;
    try { host = new URL(url).host; } catch { /* keep the string */ }
    throw unavailable(`${init?.method ?? 'GET'} ${host}: ${describe(e)} (not in allowed_hosts, or unreachable)`);
  }
}

/** Map a failed token-endpoint response (status + parsed body) to a provider
 * error: denied for a refused client or grant, unavailable for 5xx/429/408
 * (carrying `retryAfter` ms, e.g. `retryAfterMs(res)`), misconfigured for a bad
 * request. */
export function oauth2Error(status, body, retryAfter = undefined) {
  const error = body && typeof body === 'object' && typeof body.error === 'string' ? body.error : undefined;
  if (error === undefined) {
    if (status >= 500 || status === 429 || status === 408) return unavailable(`token endpoint answered HTTP ${status}`, retryAfter);
    if (status === 401 || status === 403) return denied(`token endpoint refused the client (HTTP ${status})`);
    return misconfigured(`token endpoint answered HTTP ${status} without an OAuth2 error`);
  }
  const detail = `${error.replace(/[^\x20-\x7e]/g, '').slice(0, 200)} (HTTP ${status})`;
  if (['invalid_client', 'unauthorized_client', 'invalid_grant', 'access_denied'].includes(error)) return denied(detail);
  if (['temporarily_unavailable', 'server_error'].includes(error) || status >= 500 || status === 429) return unavailable(detail, retryAfter);
  return misconfigured(detail);
}

function describe(e) {
  if (e && typeof e === 'object') {
    if ('payload' in e) return JSON.stringify(e.payload?.val ?? e.payload);
    if ('message' in e) return e.message;
  }
  return String(e);
}

function outage(message, retryAfterMs) {
  const ms = Number(retryAfterMs);
  return {
    message,
    retryAfterMs: retryAfterMs === undefined || retryAfterMs === null || !Number.isFinite(ms) || ms < 0
      ? undefined
      : BigInt(Math.min(Math.floor(ms), Number.MAX_SAFE_INTEGER)),
  };
}

function toWit(e) {
  if (e instanceof ProviderError) {
    return e.tag === 'unavailable'
      ? { tag: 'unavailable', val: outage(e.message, e.retryAfterMs) }
      : { tag: e.tag, val: e.message };
  }
  // Anything else is a bug in the provider: say so in the log, and report it as
  // `unavailable` so that the host backs off instead of hammering the IdP.
  console.error(`provider threw: ${e && e.stack ? e.stack : e}`);
  return { tag: 'unavailable', val: outage(`provider threw ${e && e.name ? e.name : typeof e}: ${describe(e)}`) };
}

/** Wrap `{ describe, getCredentials, handleSecurityError }` (sync or async) as
 * the component's `authProvider` export: a thrown `ProviderError` becomes the
 * `provider-error` result; any other exception becomes `unavailable` and is
 * logged; a throwing `handleSecurityError` means `fail`. `describe` is
 * `{ name, version, config: [key(...), …] }` (contract 0.2: the host checks the
 * config against it and redacts the keys declared secret); without it the
 * provider declares no schema. */
export function provider({ describe: descriptor, getCredentials, handleSecurityError }) {
  return {
    describe() {
      const d = typeof descriptor === 'function' ? descriptor() : descriptor;
      return {
        name: d?.name ?? '',
        version: d?.version ?? '',
        config: Array.isArray(d?.config) ? d.config : undefined,
      };
    },
    async getCredentials(request) {
      try {
        return await getCredentials(request);
      } catch (e) {
        throw toWit(e);
      }
    },
    handleSecurityError(request, creds, error) {
      try {
        return handleSecurityError ? handleSecurityError(request, creds, error) : fail();
      } catch (e) {
        console.error(`handleSecurityError threw: ${e && e.stack ? e.stack : e}`);
        return fail();
      }
    },
  };
}
