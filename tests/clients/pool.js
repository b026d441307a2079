// node-postgres's pg.Pool through the proxy (#22): about 20 queries a second
// for the given seconds, no retries; prints one JSON object as pools.py does.
//
//     node pool.js 'postgresql://app@127.0.0.1:PORT/postgres' SECONDS
const { Pool } = require("pg");

async function main() {
  const [url, seconds] = process.argv.slice(2);
  const pool = new Pool({ connectionString: url, max: 4 });
  // An error on an idle pooled connection is emitted here; unhandled, it
  // would end the process. Counted as a failure.
  const failures = [];
  pool.on("error", (e) => failures.push(`idle: ${e.code || ""} ${e.message}`));
  const users = [];
  let queries = 0;
  const end = Date.now() + Number(seconds) * 1000;
  while (Date.now() < end) {
    queries += 1;
    try {
      const r = await pool.query("SELECT current_user AS u");
      const user = r.rows[0].u;
      if (users[users.length - 1] !== user) users.push(user);
    } catch (e) {
      failures.push(`${e.code || ""} ${e.message}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  await pool.end();
  const result = { queries, failed: failures.length, failures: failures.slice(0, 10), users };
  console.log(JSON.stringify({ "node-postgres": result }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
