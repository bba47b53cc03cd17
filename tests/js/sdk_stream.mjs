// Drive the official LangGraph JS SDK against a base URL (a real Agent Server or the gateway)
// and print ONE JSON line: {"stream": [[event, data], ...], "join": [...], "thread_id", "run_ids"}.
// Usage: node sdk_stream.mjs http://127.0.0.1:PORT [package]
// package: "@langchain/langgraph-sdk" (2.0.0, the default) or "@langchain/langgraph-sdk-latest" (1.15.0,
// what npm installs today; an alias in package.json).
const { Client } = await import(process.argv[3] ?? "@langchain/langgraph-sdk");

const apiUrl = process.argv[2];
if (!apiUrl) {
  console.error("usage: node sdk_stream.mjs <base-url>");
  process.exit(2);
}

// apiKey: null stops the SDK from picking up LANGSMITH_API_KEY etc. from the environment.
const client = new Client({ apiUrl, apiKey: null });

async function main() {
  const assistants = await client.assistants.search({ limit: 10 });
  if (!assistants.some((a) => a.graph_id === "ticker")) {
    throw new Error(`no ticker assistant in ${JSON.stringify(assistants.map((a) => a.graph_id))}`);
  }
  const thread = await client.threads.create();
  const runIds = [];

  const stream = [];
  for await (const part of client.runs.stream(thread.thread_id, "ticker", {
    input: { n: 5, delay: 0.02 },
    streamMode: ["custom", "values"],
  })) {
    // The first event is metadata {run_id}; record it so the caller can correlate.
    if (part.event === "metadata" && part.data?.run_id) runIds.push(part.data.run_id);
    stream.push([part.event, part.data]);
  }

  const run = await client.runs.create(thread.thread_id, "ticker", {
    input: { n: 5, delay: 0.02 },
    streamMode: ["custom", "values"],
  });
  runIds.push(run.run_id);
  const join = [];
  for await (const part of client.runs.joinStream(thread.thread_id, run.run_id)) {
    join.push([part.event, part.data]);
  }

  process.stdout.write(JSON.stringify({ stream, join, thread_id: thread.thread_id, run_ids: runIds }) + "\n");
}

main().catch((err) => {
  console.error(err?.stack ?? String(err));
  process.exit(1);
});
