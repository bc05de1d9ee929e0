// HTTPS with Node.js's own (statically linked) OpenSSL.
//   node tls_node.js server CERT KEY      serve on 127.0.0.1, print the port; GET /PATH -> 200
//   node tls_node.js client PORT PATH...  one keep-alive connection, the paths in order;
//                                         prints "STATUS LOCAL_PORT" per request, then
//                                         keeps the connection open until stdin ends
'use strict';
const fs = require('fs');
const https = require('https');

function server(cert, key) {
  const srv = https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)},
    (req, res) => {
      req.resume();
      req.on('end', () => {
        const body = `node saw ${req.method} ${req.url}\n`;
        res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': body.length});
        res.end(body);
      });
    });
  srv.keepAliveTimeout = 30000;
  srv.listen(0, '127.0.0.1', () => console.log(srv.address().port));
}

async function client(port, paths) {
  const agent = new https.Agent({keepAlive: true, maxSockets: 1});
  for (const path of paths) {
    await new Promise((resolve, reject) => {
      const req = https.request({host: '127.0.0.1', port, path, agent, rejectUnauthorized: false,
                                 headers: {'User-Agent': 'probe-e2e/1'}}, (res) => {
        const localPort = res.socket.localPort;
        res.resume();
        res.on('end', () => {
          console.log(`${res.statusCode} ${localPort}`);
          resolve();
        });
      });
      req.on('error', reject);
      req.end();
    });
  }
  process.stdin.resume();
  process.stdin.on('end', () => agent.destroy());
}

const [mode, ...rest] = process.argv.slice(2);
if (mode === 'server') server(rest[0], rest[1]);
else client(Number(rest[0]), rest.slice(1));
