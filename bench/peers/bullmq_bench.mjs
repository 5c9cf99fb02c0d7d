// BullMQ peer of bench/run_all.py (queue phase): N no-op jobs added with addBulk, then drained
// by one Worker at the given concurrency, against the same Redis as Conveyor's queue phase.
// usage: node bullmq_bench.mjs REDIS_URL N CONCURRENCY
// Prints progress lines {"t": s, "done": n} every 0.1 s and a last line {"result": {...}}.
import { createRequire } from "node:module";
import { Queue, Worker } from "bullmq";

const require = createRequire(import.meta.url);
const [url, nArg, cArg] = process.argv.slice(2);
const n = Number(nArg ?? 50000);
const concurrency = Number(cArg ?? 64);
const u = new URL(url ?? "redis://127.0.0.1:6379/0");
const connection = {
  host: u.hostname,
  port: Number(u.port || 6379),
  db: Number(u.pathname.slice(1) || 0),
  maxRetriesPerRequest: null,
};
// Completed jobs kept like Conveyor's completed log (1,000 summaries); nothing else changed.
const jobOpts = { removeOnComplete: { count: 1000 } };

const queue = new Queue("conveyor-bench", { connection });
await queue.obliterate({ force: true });
const payload = { flow_id: "bench", trigger: { n: 0 } };
let t0 = performance.now();
for (let start = 0; start < n; start += 1000) {
  const jobs = [];
  for (let i = start; i < Math.min(n, start + 1000); i++) {
    jobs.push({ name: "noop", data: payload, opts: { ...jobOpts, jobId: `job-${i}` } });
  }
  await queue.addBulk(jobs);
}
const enqueueS = (performance.now() - t0) / 1000;

let done = 0;
let resolveAll;
const all = new Promise((resolve) => {
  resolveAll = resolve;
});
const worker = new Worker("conveyor-bench", async () => {}, {
  connection,
  concurrency,
  autorun: false,
});
worker.on("completed", () => {
  done += 1;
  if (done >= n) resolveAll();
});
t0 = performance.now();
const ticker = setInterval(() => {
  console.log(JSON.stringify({ t: (performance.now() - t0) / 1000, done }));
}, 100);
worker.run();
await all;
const processS = (performance.now() - t0) / 1000;
clearInterval(ticker);
await worker.close();
await queue.obliterate({ force: true });
await queue.close();
const version = require("bullmq/package.json").version;
console.log(
  JSON.stringify({
    result: { n, concurrency, enqueue_s: enqueueS, process_s: processS, bullmq: version },
  }),
);
process.exit(0);
