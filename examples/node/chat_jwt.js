// Chat completions through api-key-server with a JWT, using the official `openai` npm
// package (6.x runs on Node 20; 7.x needs Node 22).
//
// The app never holds the OpenAI key: it sends a short-lived token (minted by your
// backend, or by `api-key-server mint-jwt`) as the SDK's apiKey, and the proxy adds the
// product's key upstream.
//
// Environment:
//   PROXY_URL     the proxy, e.g. http://127.0.0.1:8080 (the SDK needs the /v1 suffix,
//                 added here)
//   PROXY_JWT     the token
//   PROXY_MODEL   optional, default gpt-4o-mini
//   PROXY_EXPECT  optional text the replies must contain (used by run-all.sh)
//
// Exits non-zero on any failure.
'use strict';
const OpenAI = require('openai');

async function main() {
  const client = new OpenAI({
    baseURL: process.env.PROXY_URL.replace(/\/+$/, '') + '/v1',
    apiKey: process.env.PROXY_JWT,
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
}

main().catch((error) => {
  console.error(`FAILED: ${error.message}`);
  process.exit(1);
});
