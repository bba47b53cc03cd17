// A chat-like page on its own origin that streams a run of the example `ticker` graph through the
// gateway with the official React `useStream` hook, as a front-end would.
//
// Query string: ?api=<gateway base URL>&n=<custom events>&delay=<seconds between them>
// The thread id goes into the URL (`&thread=`) once the hook has one, the pattern the hook's docs
// show for `reconnectOnMount`: after a reload the hook finds the run it stored in sessionStorage
// for that thread and re-joins it with `joinStream` (a GET of the run's stream, Last-Event-ID -1).
//
// What the page holds is rendered as JSON into <pre id="state"> for tests/test_browser.py.
import React, { useState } from "react";
import { createRoot } from "react-dom/client";
import { useStream } from "@langchain/langgraph-sdk/react";

const params = new URLSearchParams(window.location.search);
const apiUrl = params.get("api");
const n = Number(params.get("n") ?? "10");
const delay = Number(params.get("delay") ?? "0.1");

function errorText(err) {
  if (err == null) return null;
  return String(err?.message ?? err);
}

function App() {
  const [threadId, setThreadId] = useState(() => params.get("thread"));
  const [custom, setCustom] = useState([]);
  const [errors, setErrors] = useState([]);
  const [finished, setFinished] = useState(false);

  const stream = useStream({
    apiUrl,
    apiKey: null, // never an API key from anywhere
    assistantId: "ticker",
    threadId,
    onThreadId: (id) => {
      const url = new URL(window.location.href);
      url.searchParams.set("thread", id);
      window.history.replaceState(null, "", url);
      setThreadId(id);
    },
    reconnectOnMount: true,
    onCustomEvent: (data) => setCustom((seen) => [...seen, data]),
    onError: (err) => setErrors((seen) => [...seen, errorText(err)]),
    onFinish: () => setFinished(true),
  });

  const start = () => {
    stream.submit({ n, delay }, { streamMode: ["values", "custom"] });
  };

  const state = {
    threadId,
    isLoading: stream.isLoading,
    finished,
    error: errorText(stream.error),
    errors,
    custom: custom.map((d) => d.i),
    values: stream.values,
  };
  return (
    <main>
      <button id="start" onClick={start} disabled={threadId != null}>Start</button>
      <pre id="state">{JSON.stringify(state)}</pre>
    </main>
  );
}

createRoot(document.getElementById("root")).render(<App />);
