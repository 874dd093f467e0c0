// Chat completions through api-key-server with HMAC request signatures, using the
// official `openai` npm package.
//
// A custom `fetch` signs every request the SDK sends, retries included, each with a fresh
// timestamp and nonce (a retry with the old nonce would be refused as a replay). It signs
// exactly what goes on the wire: the path without its query and the body as sent.
//
// Environment:
//   PROXY_URL          the proxy, e.g. http://127.0.0.1:8080
//   PROXY_HMAC_CLIENT  the client id (a key of CLIENT_HMAC_SECRETS)
//   PROXY_HMAC_SECRET  the client's shared secret (keep it out of source and argv)
//   PROXY_PRODUCT      optional, default demo
//   PROXY_USER         optional, default example-user
//   PROXY_MODEL        optional, default gpt-4o-mini
//   PROXY_EXPECT       optional text the replies must contain (used by run-all.sh)
//
// Exits non-zero on any failure.
'use strict';
const crypto = require('node:crypto');
const OpenAI = require('openai');

/** A fetch that adds the proxy's HMAC headers to each request. */
function signingFetch({ clientId, secret, product, user }) {
  return async (url, init = {}) => {
    // The SDK sends JSON bodies as strings; GETs have none.
    const body = init.body == null ? Buffer.alloc(0) : Buffer.from(init.body);
    const timestamp = String(Math.floor(Date.now() / 1000));
    const nonce = crypto.randomBytes(24).toString('base64url'); // 32 chars of [A-Za-z0-9_-]
    const path = new URL(url).pathname; // percent-encoded, without the query
    const bodyHash = crypto.createHash('sha256').update(body).digest('hex');
    const stringToSign = [timestamp, init.method || 'GET', path, clientId, product, user, nonce, bodyHash].join('\n');
    const headers = new Headers(init.headers);
    // The SDK always sends its apiKey as a Bearer token; next to a signature the proxy
    // would refuse the request as ambiguous, so it goes.
    headers.delete('authorization');
    headers.set('X-Client-Id', clientId);
    headers.set('X-Timestamp', timestamp);
    headers.set('X-Nonce', nonce);
    headers.set('X-Product-Id', product);
    headers.set('X-User-Id', user);
    headers.set('X-Signature', crypto.createHmac('sha256', secret).update(stringToSign).digest('hex'));
    return fetch(url, { ...init, headers });
  };
}

async function main() {
  const client = new OpenAI({
    baseURL: process.env.PROXY_URL.replace(/\/+$/, '') + '/v1',
    apiKey: 'unused-with-hmac', // the SDK requires one; the fetch removes it
    fetch: signingFetch({
      clientId: process.env.PROXY_HMAC_CLIENT,
      secret: process.env.PROXY_HMAC_SECRET,
      product: process.env.PROXY_PRODUCT || 'demo',
      user: process.env.PROXY_USER || 'example-user',
    }),
    timeout: 60_000,
  });
  const model = process.env.PROXY_MODEL || 'gpt-4o-mini';
  const expect = (process.env.PROXY_EXPECT || '').toLowerCase();
  const messages = [{ role: 'user', content: 'Say hello' }];

  const reply = await client.chat.completions.create({ model, messages });
  const text = reply.choices[0].message.content || '';
  console.log(`plain:    ${text}`);
  if (!text || !text.toLowerCase().includes(expect)) throw new Error(`unexpected reply: ${text}`);

  let streamed = '';
  const stream = await client.chat.completions.create({ model, messages, stream: true });
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content || '';
  console.log(`streamed: ${streamed}`);
  if (!streamed || !streamed.toLowerCase().includes(expect)) throw new Error(`unexpected streamed reply: ${streamed}`);

  // The models list goes through the same fetch (GET, empty body).
  const models = [];
  for await (const m of client.models.list()) models.push(m.id);
  console.log(`models:   ${models.join(', ')}`);
  if (!models.includes(model)) throw new Error(`${model} is not in the proxy's models: ${models}`);
}

main().catch((error) => {
  console.error(`FAILED: ${error.message}`);
  process.exit(1);
});
