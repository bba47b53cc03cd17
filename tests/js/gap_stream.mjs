// Stream one run through a base URL twice, and print ONE JSON line:
//   {"sdk": version, "client": [[event, data], ...], "client_error": null | string,
//    "hook": {"custom": [...], "error": null | string, "finished": bool}}
// "client" is the official JS SDK's runs.stream; "hook" feeds the same kind of stream through
// the StreamManager that the React useStream hook is built on (same callbacks, same error rules),
// so a gateway-made event (the gap marker) can be checked for what the UI would make of it.
// Usage: node gap_stream.mjs <base-url> '<run input as JSON>' [package]
// package: "@langchain/langgraph-sdk" (2.0.0, the default) or "@langchain/langgraph-sdk-latest" (1.15.0,
// what npm installs today; an alias in package.json).
const [apiUrl, inputJson, pkg = "@langchain/langgraph-sdk"] = process.argv.slice(2);
const { Client } = await import(pkg);
// Not in the package's exports map: the file path is the hook's own implementation.
const { StreamManager } = await import(`./node_modules/${pkg}/dist/ui/manager.js`);
const { MessageTupleManager } = await import(`./node_modules/${pkg}/dist/ui/messages.js`);
const { readFileSync } = await import("node:fs");
const sdkVersion = JSON.parse(readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url))).version;

const input = JSON.parse(inputJson ?? "{}");
const client = new Client({ apiUrl, apiKey: null });

async function viaClient() {
  const thread = await client.threads.create();
  const events = [];
  try {
    for await (const part of client.runs.stream(thread.thread_id, "ticker", { input, streamMode: ["custom"] })) {
      events.push([part.event, part.data]);
    }
    return { events, error: null };
  } catch (err) {
    return { events, error: String(err?.message ?? err) };
  }
}

async function viaHook() {
  const manager = new StreamManager(new MessageTupleManager(), { throttle: false });
  const custom = [];
  let error = null;
  let finished = false;
  const thread = await client.threads.create();
  await manager.start(
    async (signal) => client.runs.stream(thread.thread_id, "ticker", { input, streamMode: ["custom"], signal }),
    {
      getMessages: (values) => values?.messages ?? [],
      setMessages: (values, messages) => ({ ...values, messages }),
      initialValues: {},
      callbacks: { onCustomEvent: (data) => custom.push(data) },
      onSuccess: async () => undefined,
      onError: async (err) => { error = String(err?.message ?? err); },
      onFinish: () => { finished = true; },
    },
  );
  await manager.queue;
  return { custom, error: error ?? (manager.state.error ? String(manager.state.error) : null), finished };
}

async function main() {
  const c = await viaClient();
  const hook = await viaHook();
  process.stdout.write(JSON.stringify({ sdk: sdkVersion, client: c.events, client_error: c.error, hook }) + "\n");
}

main().catch((err) => {
  console.error(err?.stack ?? String(err));
  process.exit(1);
});
