// A desktop app (Electron, say) that calls OpenAI through api-key-server with short-lived
// tokens from its product's backend (examples/python/product_backend.py), refreshed
// before they expire: the Node twin of examples/python/desktop_client.py, which says why
// a desktop holds no signing key.
//
// The SDK's `apiKey` option takes an async function, which the SDK awaits before every
// request (retries included); it answers from its cache until the token has less than
// `margin` seconds left, then fetches a new one.
//
// Environment: PROXY_URL, BACKEND_URL, BACKEND_SESSION, REFRESH_MARGIN_SECONDS (default
// 30), PROXY_MODEL, PROXY_EXPECT, as for the Python example. Exits non-zero on failure.
'use strict';
const OpenAI = require('openai');

/** The app's current proxy token, fetched from the product backend when needed. */
function proxyToken(backendUrl, session, marginSeconds = 30) {
  const state = { token: '', exp: 0, fetches: 0, pending: null };
  const fetchToken = async () => {
    const response = await fetch(`${backendUrl.replace(/\/+$/, '')}/token`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${session}` },
      signal: AbortSignal.timeout(10_000),
    });
    if (!response.ok) throw new Error(`the backend refused a token: ${response.status}`);
    const { token } = await response.json();
    // The app reads exp from the token's payload to know when to refresh; it need not
    // verify the signature: the proxy does.
    const claims = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
    Object.assign(state, { token, exp: claims.exp, fetches: state.fetches + 1 });
  };
  const get = async () => {
    if (Date.now() / 1000 > state.exp - marginSeconds) {
      // Concurrent requests share one fetch.
      state.pending ??= fetchToken().finally(() => (state.pending = null));
      await state.pending;
    }
    return state.token;
  };
  return { get, state, marginSeconds };
}

async function main() {
  const tokens = proxyToken(
    process.env.BACKEND_URL,
    process.env.BACKEND_SESSION,
    Number(process.env.REFRESH_MARGIN_SECONDS || 30),
  );
  const client = new OpenAI({
    baseURL: process.env.PROXY_URL.replace(/\/+$/, '') + '/v1',
    apiKey: tokens.get,
    timeout: 60_000,
  });
  const model = process.env.PROXY_MODEL || 'gpt-4o-mini';
  const expect = (process.env.PROXY_EXPECT || '').toLowerCase();

  const ask = async (n) => {
    const reply = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'Say hello' }] });
    const text = reply.choices[0].message.content || '';
    console.log(`call ${n}: ${text} (token fetches so far: ${tokens.state.fetches})`);
    if (!text || !text.toLowerCase().includes(expect)) throw new Error(`unexpected reply: ${text}`);
    return tokens.state.token;
  };

  const first = await ask(1);
  if ((await ask(2)) !== first || tokens.state.fetches !== 1) {
    throw new Error(`the second call should reuse the first token; fetches: ${tokens.state.fetches}`);
  }
  const wait = Math.max(tokens.state.exp - tokens.marginSeconds - Date.now() / 1000 + 0.5, 0);
  console.log(`waiting ${wait.toFixed(1)} s until the token is within ${tokens.marginSeconds} s of its exp`);
  await new Promise((resolve) => setTimeout(resolve, wait * 1000));
  if ((await ask(3)) === first || tokens.state.fetches !== 2) {
    throw new Error(`the third call should use a fresh token; fetches: ${tokens.state.fetches}`);
  }
}

main().catch((error) => {
  console.error(`FAILED: ${error.message}`);
  process.exit(1);
});
