// One npm client against one scenario stream; prints one JSON line:
//   {"events": [{"type", "data", "id"}...], "end": "end-event"|"closed"|"error"|"timeout", "error": "..."}
// Usage: node node_client.mjs CLIENT URL TIMEOUT_S TYPES(comma-separated)
// Run with NODE_PATH unset; the harness runs it with cwd = the npm directory,
// where package.json (tests/clients/package.json) was installed.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const [client, url, timeoutS, typesArg] = process.argv.slice(2);
const types = typesArg.split(",");
const npmDir = process.cwd();
const require = createRequire(`${npmDir}/`);
const load = async (name) => import(pathToFileURL(require.resolve(name)).href);

const events = [];
let done = false;
function finish(end, error) {
  if (done) return;
  done = true;
  const out = { events, end };
  if (error !== undefined) out.error = String(error);
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(0));
}
function record(type, data, id) {
  if (done) return;
  events.push({ type, data, id: id ?? null });
  if (type === "end") finish("end-event");
}
setTimeout(() => finish("timeout"), Number(timeoutS) * 1000);

// The EventSource API (npm eventsource 2, 3, 4, 5): listen to every type the scenario sends.
function runEventSource(EventSource) {
  const es = new EventSource(url);
  for (const type of types) {
    es.addEventListener(type, (e) => {
      record(e.type, e.data, e.lastEventId);
      if (done) es.close();
    });
  }
  es.onerror = (e) => {
    // readyState 2 (CLOSED): the client gave up; 0 (CONNECTING): it reconnects.
    // eventsource 2 closes just after the error event: look once it has run.
    const why = e && (e.message || e.status || e.code);
    setTimeout(() => es.readyState === 2 && finish("closed", why), 0);
  };
}

// @microsoft/fetch-event-source outside a browser: it uses window.setTimeout,
// window.fetch and document's visibility events, which Node lacks.
function browserShim() {
  globalThis.window = globalThis;
  globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };
}

// [fetch-event-source-handlers]
// Stop on 204 (and other answers that are not a stream), retry after a clean close.
class FatalError extends Error {}
class RetriableError extends Error {}
const handlers = {
  async onopen(response) {
    const type = response.headers.get("content-type") || "";
    if (response.ok && type.startsWith("text/event-stream")) return;
    throw new FatalError(`HTTP ${response.status}`); // 204: the server says stop
  },
  onclose() {
    throw new RetriableError("stream ended"); // by default a clean close ends it
  },
  onerror(err) {
    if (err instanceof FatalError) throw err; // rethrow: stop
    // return nothing: retry after the server's retry: interval (default 1 s)
  },
};
// [/fetch-event-source-handlers]

async function main() {
  if (/^eventsource\d$/.test(client)) {
    const mod = await load(client);
    runEventSource(mod.EventSource ?? mod.default ?? mod);
  } else if (client === "eventsource-parser") {
    const { createParser } = await load("eventsource-parser");
    const parser = createParser({
      onEvent: (e) => record(e.event ?? "message", e.data, e.id),
    });
    const response = await fetch(url, { headers: { Accept: "text/event-stream" } });
    if (response.status !== 200) return finish("closed", `HTTP ${response.status}`);
    const decoder = new TextDecoder();
    for await (const chunk of response.body) {
      parser.feed(decoder.decode(chunk, { stream: true }));
      if (done) return;
    }
    finish("closed");
  } else if (client.startsWith("fetch-event-source")) {
    const { fetchEventSource } = await load("@microsoft/fetch-event-source");
    const variant = client.slice("fetch-event-source".length);
    if (variant !== "") browserShim();
    const options = {
      onmessage: (e) => record(e.event || "message", e.data, e.id),
      onerror: (err) => {
        if (done) throw err;
      },
    };
    if (variant === "+handlers") {
      Object.assign(options, handlers);
      const onerror = options.onerror;
      options.onerror = (err) => {
        if (done) throw err;
        return onerror(err);
      };
    }
    const ac = new AbortController();
    options.signal = ac.signal;
    const timer = setInterval(() => done && ac.abort(), 50);
    try {
      await fetchEventSource(url, options);
      finish("closed");
    } catch (err) {
      finish("error", `${err.name}: ${err.message}`);
    } finally {
      clearInterval(timer);
    }
  } else {
    throw new Error(`unknown client ${client}`);
  }
}

main().catch((err) => finish("error", `${err.name}: ${err.message}`));
