// How the official `openai` npm package behaves on api-key-server's errors, checked for
// real (the Node twin of examples/python/errors.py):
//
// - a bad token: AuthenticationError (401), not retried;
// - rate_limit_exceeded: RateLimitError with the wait in Retry-After; with retries on, the
//   SDK waits that long and the retry succeeds;
// - daily_quota_exceeded: RateLimitError, not retried (x-should-retry: false; without it
//   the SDK would sleep until midnight);
// - upstream_auth_failed (OpenAI refused the product's key): InternalServerError (502),
//   not retried.
//
// Attempts are counted by wrapping the SDK's fetch, so SDK retries show up.
//
// Environment:
//   PROXY_URL                       any proxy, for the bad-token case
//   PROXY_LIMITED_URL, PROXY_LIMITED_JWT
//       a proxy with RATE_LIMIT_CAPACITY=1, RATE_LIMIT_REFILL_PER_SECOND=0.5 and
//       DAILY_QUOTA=2, whose token's user has not used it yet
//   PROXY_BADKEY_URL, PROXY_BADKEY_JWT
//       a proxy whose upstream answers 401
//   PROXY_BADKEY_UPSTREAM_REQUESTS  that upstream's request counter (GET: {"chat": N})
//
// Exits non-zero on any failure.
'use strict';
const OpenAI = require('openai');

const request = { model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Say hello' }] };

/** Every HTTP exchange of the SDK, retries included: when it was sent, and the Retry-After that came back. */
class Attempts {
  constructor() {
    this.reset();
  }
  reset() {
    this.times = [];
    this.retryAfter = [];
  }
  fetch = async (url, init) => {
    this.times.push(performance.now());
    const response = await fetch(url, init);
    this.retryAfter.push(response.headers.get('retry-after'));
    return response;
  };
}

function client(url, apiKey, attempts) {
  // maxRetries stays at the SDK's default (2).
  return new OpenAI({ baseURL: url.replace(/\/+$/, '') + '/v1', apiKey, fetch: attempts.fetch, timeout: 30_000 });
}

function check(condition, what) {
  if (!condition) throw new Error(what);
}

/** Runs `call`, which must fail with an error of class `type`; returns that error. */
async function refused(call, type) {
  try {
    await call();
  } catch (error) {
    check(error instanceof type, `expected ${type.name}, got ${error}`);
    return error;
  }
  throw new Error(`expected ${type.name}, got a reply`);
}

async function badToken() {
  const attempts = new Attempts();
  const sdk = client(process.env.PROXY_URL, 'not-a-valid-token', attempts);
  const error = await refused(() => sdk.chat.completions.create(request), OpenAI.AuthenticationError);
  check(error.code === 'invalid_token', `code ${error.code}`);
  check(attempts.times.length === 1, `401 was retried: ${attempts.times.length} attempts`);
  console.log(`401 AuthenticationError code=${error.code} requestID=${error.requestID}, 1 attempt`);
}

async function rateLimits() {
  const attempts = new Attempts();
  const sdk = client(process.env.PROXY_LIMITED_URL, process.env.PROXY_LIMITED_JWT, attempts);
  await sdk.chat.completions.create(request); // takes the one token

  // Retries off: the 429 reaches the app, which can read how long to wait.
  let error = await refused(() => sdk.chat.completions.create(request, { maxRetries: 0 }), OpenAI.RateLimitError);
  const retryAfter = Number(error.headers.get('retry-after'));
  check(error.code === 'rate_limit_exceeded', `code ${error.code}`);
  check(retryAfter >= 1 && retryAfter <= 2, `Retry-After ${retryAfter} (refill 0.5/s: at most 2)`);
  console.log(`429 RateLimitError code=${error.code} Retry-After=${retryAfter}s`);

  // Retries on (the default): the SDK waits Retry-After, then the retry gets the new token.
  attempts.reset();
  const reply = await sdk.chat.completions.create(request);
  check(reply.choices[0].message.content, 'no reply after the retry');
  check(attempts.times.length === 2, `${attempts.times.length} attempts, expected 1 refusal + 1 retry`);
  const waited = (attempts.times[1] - attempts.times[0]) / 1000;
  const asked = Number(attempts.retryAfter[0]);
  check(asked >= 1 && waited >= asked - 0.1, `retried after ${waited.toFixed(2)}s; Retry-After was ${asked}`);
  console.log(`429 rate_limit_exceeded: the SDK retried once after ${waited.toFixed(1)}s and got a reply`);

  // The daily quota (2) is used up: refused, and not retried despite maxRetries 2.
  attempts.reset();
  error = await refused(() => sdk.chat.completions.create(request), OpenAI.RateLimitError);
  check(error.code === 'daily_quota_exceeded', `code ${error.code}`);
  check(error.headers.get('x-should-retry') === 'false', 'x-should-retry is not false');
  check(attempts.times.length === 1, `daily_quota_exceeded was retried: ${attempts.times.length} attempts`);
  console.log(`429 daily_quota_exceeded: not retried, Retry-After=${error.headers.get('retry-after')}s`);
}

async function upstreamAuthFailed() {
  const upstreamRequests = async () =>
    (await (await fetch(process.env.PROXY_BADKEY_UPSTREAM_REQUESTS, { signal: AbortSignal.timeout(5000) })).json())
      .chat;
  const before = await upstreamRequests();
  const attempts = new Attempts();
  const sdk = client(process.env.PROXY_BADKEY_URL, process.env.PROXY_BADKEY_JWT, attempts);
  const error = await refused(() => sdk.chat.completions.create(request), OpenAI.InternalServerError);
  check(error.status === 502 && error.code === 'upstream_auth_failed', `${error.status} ${error.code}`);
  check(attempts.times.length === 1, `upstream_auth_failed was retried: ${attempts.times.length} attempts`);
  check((await upstreamRequests()) - before === 1, 'the upstream did not see exactly one request');
  console.log('502 InternalServerError code=upstream_auth_failed: not retried, 1 upstream request');
}

async function main() {
  await badToken();
  await rateLimits();
  await upstreamAuthFailed();
}

main().catch((error) => {
  console.error(`FAILED: ${error.message}`);
  process.exit(1);
});
