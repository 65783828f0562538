// The official TypeScript MCP SDK against session-proxy: connect, list, exec, progress, cancel.
// Usage: node ts_sdk.mjs '<json>' with {url, token?, stdio?: [command, ...args], env?, marker, gate}.
// Prints one JSON line per step on stdout; any failure exits non-zero with the error on stderr.
import { existsSync, writeFileSync } from "node:fs";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const options = JSON.parse(process.argv[2]);
const say = (step, detail = {}) => console.log(JSON.stringify({ step, ...detail }));
const text = (result) => result.content.map((block) => block.text).join("");
const check = (ok, what) => {
  if (!ok) throw new Error(what);
};

function transport() {
  if (options.stdio) {
    const [command, ...args] = options.stdio;
    return new StdioClientTransport({ command, args, env: { ...process.env, ...options.env }, stderr: "inherit" });
  }
  const headers = options.token ? { Authorization: `Bearer ${options.token}` } : {};
  return new StreamableHTTPClientTransport(new URL(options.url), { requestInit: { headers } });
}

// Resolves with the first progress message that contains `wanted`.
function progressWatcher(wanted) {
  let seen;
  const arrived = new Promise((resolve) => (seen = resolve));
  const onprogress = (progress) => {
    if ((progress.message ?? "").includes(wanted)) seen(progress.message);
  };
  return { arrived, onprogress };
}

const client = new Client({ name: "ts-sdk-test", version: "1.0.0" });
await client.connect(transport());
say("connected", { server: client.getServerVersion() });

const { tools } = await client.listTools();
say("listed", { tools: tools.map((tool) => tool.name) });

const echo = await client.callTool({ name: "exec", arguments: { command: "echo hello from node" } });
check(text(echo).startsWith("hello from node\n"), `unexpected exec result: ${text(echo)}`);
say("exec", { text: text(echo), structured: echo.structuredContent });

// Progress arrives while the command runs: it waits on a gate the client opens only after
// it has seen the command's first line in a progress message.
const ready = progressWatcher(`ready-${options.marker}`);
const gated = client.callTool(
  {
    name: "exec",
    arguments: { command: `echo ready-${options.marker}; while [ ! -e '${options.gate}' ]; do sleep 0.05; done; echo passed` },
  },
  undefined,
  { onprogress: ready.onprogress, resetTimeoutOnProgress: true },
);
const message = await ready.arrived;
check(!existsSync(options.gate), "the gate was open before progress arrived");
writeFileSync(options.gate, "");
const passed = await gated;
check(text(passed).includes("passed\n"), `unexpected gated result: ${text(passed)}`);
say("progress", { message });

// Cancelling the call (AbortSignal) ends the command.
const started = progressWatcher(`started-${options.marker}`);
const abort = new AbortController();
const cancelled = client
  .callTool(
    { name: "exec", arguments: { command: `echo started-${options.marker}; sleep ${options.marker}` } },
    undefined,
    { onprogress: started.onprogress, signal: abort.signal },
  )
  .then(
    () => "finished",
    (error) => String(error),
  );
await started.arrived;
say("running");
abort.abort("the test cancels it");
say("aborted", { outcome: await cancelled });

await client.close();
say("closed");
