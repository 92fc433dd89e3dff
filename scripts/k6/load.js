// k6 load test for lb: ramping virtual users issue GET requests through lb
// to `be` backends, check every response is a 200 naming a backend, and
// report the share of requests each backend served (from the response
// body, which `be -c NAME` sets to NAME).
//
//   k6 run -e LB_URL=http://127.0.0.1:8000/ scripts/k6/load.js
//
// scripts/load-test.sh starts backends and lb and runs this for you.
//
// Environment (all optional except LB_URL):
//   LB_URL        URL to load, e.g. http://127.0.0.1:8000/
//   BACKENDS      comma-separated backend names expected in response bodies
//                 (default "Server A,Server B"); each must serve at least one
//                 request, and gets its own count and latency in the summary
//   VUS           peak virtual users (default 20)
//   RAMP          ramp-up time (default 10s)
//   HOLD          time at peak (default 30s)
//   DOWN          ramp-down time (default 5s)
//   P95_MS        p95 latency threshold in ms (default 100)
//   MAX_FAILED    highest tolerated failure rate (default 0: none)
//   REUSE         "1" keeps connections alive; by default every request
//                 opens a new connection, since lb balances connections,
//                 not requests
//   SUMMARY_FILE  also write the summary as key=value lines to this path
//                 (used by test_script.sh)

import http from 'k6/http';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const LB_URL = __ENV.LB_URL;
if (!LB_URL) {
  throw new Error('set LB_URL, e.g. k6 run -e LB_URL=http://127.0.0.1:8000/ scripts/k6/load.js');
}
const BACKENDS = (__ENV.BACKENDS || 'Server A,Server B')
  .split(',')
  .map((s) => s.trim())
  .filter((s) => s.length > 0);
const VUS = parseInt(__ENV.VUS || '20', 10);
const P95_MS = parseFloat(__ENV.P95_MS || '100');
const MAX_FAILED = parseFloat(__ENV.MAX_FAILED || '0');

// Responses and latency by the backend that answered ("other" for a body
// that names none of BACKENDS, e.g. an error).
const served = new Counter('backend_responses');
const latency = new Trend('backend_latency', true);

const thresholds = {
  http_req_failed: [`rate<=${MAX_FAILED}`],
  http_req_duration: [`p(95)<${P95_MS}`],
  checks: [`rate>=${1 - MAX_FAILED}`],
};
// A threshold on a tagged sub-metric is what makes k6 keep that sub-metric
// for handleSummary; "count>0" also fails the run if a backend never served.
for (const name of BACKENDS) {
  thresholds[`backend_responses{backend:${name}}`] = ['count>0'];
  thresholds[`backend_latency{backend:${name}}`] = [`p(95)<${P95_MS}`];
}

export const options = {
  scenarios: {
    ramp: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: [
        { duration: __ENV.RAMP || '10s', target: VUS },
        { duration: __ENV.HOLD || '30s', target: VUS },
        { duration: __ENV.DOWN || '5s', target: 0 },
      ],
      gracefulRampDown: '2s',
    },
  },
  noConnectionReuse: __ENV.REUSE !== '1',
  thresholds,
  summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.get(LB_URL, { timeout: '10s' });
  const body = typeof res.body === 'string' ? res.body.trim() : '';
  const backend = BACKENDS.includes(body) ? body : 'other';
  served.add(1, { backend });
  latency.add(res.timings.duration, { backend });
  check(res, {
    'status is 200': (r) => r.status === 200,
    'body names a backend': () => backend !== 'other',
  });
}

function ms(v) {
  return v === undefined ? '-' : `${v.toFixed(2)} ms`;
}

function pad(s, n) {
  s = String(s);
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

function lpad(s, n) {
  s = String(s);
  return s.length >= n ? s : ' '.repeat(n - s.length) + s;
}

export function handleSummary(data) {
  const m = data.metrics;
  const requests = m.http_reqs ? m.http_reqs.values.count : 0;
  // http_req_failed is a Rate: "passes" counts the failed requests.
  const failed = m.http_req_failed ? m.http_req_failed.values.passes : 0;
  const dur = m.http_req_duration ? m.http_req_duration.values : {};
  const total = m.backend_responses ? m.backend_responses.values.count : 0;

  const rows = [];
  let known = 0;
  for (const name of BACKENDS) {
    const c = m[`backend_responses{backend:${name}}`];
    const t = m[`backend_latency{backend:${name}}`];
    const n = c ? c.values.count : 0;
    known += n;
    rows.push({ name, n, p95: t ? t.values['p(95)'] : undefined });
  }
  rows.push({ name: 'other', n: total - known, p95: undefined });

  const crossed = [];
  for (const [name, metric] of Object.entries(m)) {
    for (const [expr, result] of Object.entries(metric.thresholds || {})) {
      if (!result.ok) crossed.push(`${name}: ${expr}`);
    }
  }

  const pct = (n) => (total > 0 ? ((100 * n) / total).toFixed(1) : '0.0');
  const lines = [
    '',
    `lb load test against ${LB_URL}`,
    `  requests: ${requests}, failed: ${failed} (${requests > 0 ? ((100 * failed) / requests).toFixed(2) : '0.00'}%), ` +
      `${(requests / (data.state.testRunDurationMs / 1000)).toFixed(0)} req/s over ${(data.state.testRunDurationMs / 1000).toFixed(1)} s`,
    `  latency: avg ${ms(dur.avg)}, median ${ms(dur.med)}, p95 ${ms(dur['p(95)'])}, p99 ${ms(dur['p(99)'])}, max ${ms(dur.max)}`,
    '',
    `  ${pad('backend', 16)}${lpad('requests', 10)}${lpad('share', 9)}${lpad('p95', 14)}`,
  ];
  for (const r of rows) {
    lines.push(`  ${pad(r.name, 16)}${lpad(r.n, 10)}${lpad(pct(r.n) + '%', 9)}${lpad(ms(r.p95), 14)}`);
  }
  lines.push('');
  lines.push(crossed.length === 0 ? '  thresholds: all passed' : `  thresholds crossed: ${crossed.join('; ')}`);
  lines.push('');

  const out = { stdout: lines.join('\n') };
  if (__ENV.SUMMARY_FILE) {
    const kv = [`requests=${requests}`, `failed=${failed}`, `p95_ms=${dur['p(95)']}`];
    for (const r of rows) {
      kv.push(`backend.${r.name}=${r.n}`);
      kv.push(`share.${r.name}=${pct(r.n)}%`);
    }
    kv.push(`thresholds_crossed=${crossed.length}`);
    out[__ENV.SUMMARY_FILE] = kv.join('\n') + '\n';
  }
  return out;
}
