// Node's http-proxy (npm "http-proxy"), one process, keep-alive to the origin.
// usage: node node_proxy.js PORT TARGET_URL   (listens on 127.0.0.1 only)
'use strict';
const http = require('http');
const httpProxy = require('http-proxy');

const port = Number(process.argv[2]);
const target = process.argv[3];
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1024 });
const proxy = httpProxy.createProxyServer({ target, agent, xfwd: true });

proxy.on('error', (err, req, res) => {
  if (!res.headersSent && typeof res.writeHead === 'function') {
    res.writeHead(502, { 'Content-Type': 'text/plain' });
  }
  res.end();
});

const server = http.createServer((req, res) => proxy.web(req, res));
// The proxy under test keeps idle client connections 75 s; do the same.
server.keepAliveTimeout = 75000;
server.headersTimeout = 76000;
server.listen(port, '127.0.0.1');
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
