// A Node.js cluster as pm2's cluster mode runs one: the primary accepts every
// connection and hands it to one of two workers (round-robin, Linux's default),
// which reads it on a descriptor the probe never saw accepted.
//   node node_cluster.js      print the port once both workers listen; GET /PATH -> 200
'use strict';
const cluster = require('cluster');
const http = require('http');

if (cluster.isPrimary) {
  cluster.schedulingPolicy = cluster.SCHED_RR;
  let listening = 0;
  cluster.on('listening', (worker, address) => {
    if (++listening === 2) console.log(address.port);
  });
  for (let i = 0; i < 2; i++) cluster.fork();
  process.on('SIGTERM', () => {
    for (const worker of Object.values(cluster.workers)) worker.kill();
    process.exit(0);
  });
} else {
  http.createServer((req, res) => {
    const body = `worker ${process.pid} saw ${req.method} ${req.url}\n`;
    res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': body.length});
    res.end(body);
  }).listen(0, '127.0.0.1');
}
