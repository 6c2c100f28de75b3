// A standard gRPC client, Node's @grpc/grpc-js, with its default options, against one Volant
// daemon: its health overall, for its service and for an unknown one, and one call of its
// service (messages as raw protobuf bytes). Prints the outcome as JSON.
//
//     node client.js TARGET SERVICE METHOD [CA CERT KEY]

const fs = require("fs");
const grpc = require("@grpc/grpc-js");

const [target, service, method, ca, cert, key] = process.argv.slice(2);
const credentials = ca
  ? grpc.credentials.createSsl(fs.readFileSync(ca), fs.readFileSync(key), fs.readFileSync(cert))
  : grpc.credentials.createInsecure();
const client = new grpc.Client(target, credentials);
const same = (bytes) => bytes;
const STATUS = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

function unary(path, body) {
  return new Promise((done) =>
    client.makeUnaryRequest(path, same, same, body, { deadline: Date.now() + 5000 }, (err, answer) =>
      done(err ? grpc.status[err.code] : answer),
    ),
  );
}

// HealthCheckRequest { service = 1 }, for names shorter than 128 bytes.
function healthRequest(name) {
  const bytes = Buffer.from(name);
  return name ? Buffer.concat([Buffer.from([0x0a, bytes.length]), bytes]) : Buffer.alloc(0);
}

(async () => {
  const out = {};
  for (const name of ["", service, "volant.nope.v1.Nope"]) {
    const answer = await unary("/grpc.health.v1.Health/Check", healthRequest(name));
    // HealthCheckResponse { status = 1 }: absent when 0.
    out["health " + name] = Buffer.isBuffer(answer) ? STATUS[answer.length >= 2 ? answer[1] : 0] : answer;
  }
  const answer = await unary(`/${service}/${method}`, Buffer.alloc(0));
  out.call = Buffer.isBuffer(answer) ? "OK" : answer;
  console.log(JSON.stringify(out));
  client.close();
})();
