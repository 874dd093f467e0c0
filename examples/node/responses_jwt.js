// The Responses API and embeddings through api-key-server with a JWT, using the official
// OpenAI SDK for Node.
//
// A response is stored upstream under the product's one key; the proxy lets only the user
// who created it read, continue or delete it (others get 404 `response_not_found`).
//
// Environment: PROXY_URL, PROXY_JWT, optional PROXY_MODEL (default gpt-4o-mini),
// PROXY_EMBEDDING_MODEL (default text-embedding-3-small) and PROXY_EXPECT (text the
// replies must contain). Exits non-zero on any failure.
'use strict';

const OpenAI = require('openai');

async function main() {
  const client = new OpenAI({
    baseURL: `${process.env.PROXY_URL.replace(/\/$/, '')}/v1`,
    apiKey: process.env.PROXY_JWT,
    timeout: 60_000,
  });
  const model = process.env.PROXY_MODEL || 'gpt-4o-mini';
  const expect = (process.env.PROXY_EXPECT || '').toLowerCase();

  const response = await client.responses.create({ model, input: 'Say hello' });
  console.log(`plain:    ${response.output_text}`);
  if (!response.output_text.toLowerCase().includes(expect)) {
    throw new Error(`unexpected reply: ${JSON.stringify(response.output_text)}`);
  }

  // The creator may read it back and continue it.
  const again = await client.responses.retrieve(response.id);
  if (again.id !== response.id) throw new Error(`retrieved ${again.id}, not ${response.id}`);
  const followUp = await client.responses.create({
    model,
    input: 'Say hello again',
    previous_response_id: response.id,
  });
  console.log(`continued: ${followUp.output_text}`);

  let streamed = '';
  let created = null;
  const stream = await client.responses.create({ model, input: 'Say hello', stream: true });
  for await (const event of stream) {
    if (event.type === 'response.created') created = event.response.id;
    else if (event.type === 'response.output_text.delta') streamed += event.delta;
  }
  console.log(`streamed: ${streamed}`);
  if (!created || !streamed.toLowerCase().includes(expect)) {
    throw new Error(`unexpected streamed reply: ${JSON.stringify(streamed)} (id ${created})`);
  }
  await client.responses.delete(created);

  const embeddingModel = process.env.PROXY_EMBEDDING_MODEL || 'text-embedding-3-small';
  const embeddings = await client.embeddings.create({ model: embeddingModel, input: ['first text', 'second text'] });
  const sizes = embeddings.data.map((item) => item.embedding.length);
  console.log(`embeddings: ${embeddings.data.length} vectors of sizes ${sizes.join(', ')}`);
  if (embeddings.data.length !== 2 || !sizes.every((n) => n > 0)) throw new Error('unexpected embeddings');
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
