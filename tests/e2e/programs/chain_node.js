// One service of a chain, on Node.js's http module (one event loop):
//   node chain_node.js [--host H] [--port P] [--downstream URL]
// Prints its port once listening. A GET for PATH is passed on as a GET for the
// same PATH to --downstream (if given), then answered 200. Knows nothing of tracing.
"use strict";
const http = require("http");

const args = { host: "0.0.0.0", port: "0", downstream: "" };
for (let i = 2; i + 1 < process.argv.length; i += 2) {
  args[process.argv[i].replace(/^--/, "")] = process.argv[i + 1];
}

function reply(res, path, downstream) {
  const body = `node ${path} <- ${downstream}\n`;
  res.writeHead(200, { "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer((req, res) => {
  if (!args.downstream) {
    reply(res, req.url, "");
    return;
  }
  http
    .get(args.downstream + req.url, (down) => {
      let data = "";
      down.setEncoding("utf8");
      down.on("data", (chunk) => (data += chunk));
      down.on("end", () => reply(res, req.url, `${down.statusCode} ${data.trim()}`));
    })
    .on("error", (error) => {
      res.writeHead(502);
      res.end(String(error));
    });
});
server.listen(Number(args.port), args.host, 511, () => {
  console.log(server.address().port);
});
