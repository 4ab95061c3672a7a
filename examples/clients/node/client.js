#!/usr/bin/env node
// Minimal CredentialBroker client.
//
//   node client.js resolve --user U --upstream NAME [--target T]
//
// The target comes from --target, else $CREDENTIAL_BROKER_SOCKET
// (e.g. unix:///run/credential-broker/broker.sock), else 127.0.0.1:50051.
// The service definition is loaded from the repository's proto at run time
// (@grpc/proto-loader); google.rpc.Status / ErrorInfo come from the copies of
// the googleapis protos in ./protos.
//
// Exit codes: 0 credential printed, 3 user not connected, 1 any other gRPC
// error, 2 usage error. The access token itself is never printed.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const DEFAULT_TARGET = '127.0.0.1:50051';
const PROTO_ROOT = process.env.CREDENTIAL_BROKER_PROTO_ROOT || path.join(__dirname, '..', '..', '..', 'proto');

function usage(message) {
  if (message) console.error(message);
  console.error('usage: node client.js resolve --user U --upstream NAME [--target T]');
  process.exit(2);
}

function parse(argv) {
  if (argv[0] !== 'resolve') usage();
  let values;
  try {
    ({ values } = parseArgs({
      args: argv.slice(1),
      options: { user: { type: 'string' }, upstream: { type: 'string' }, target: { type: 'string' } },
    }));
  } catch (err) {
    usage(err.message);
  }
  if (!values.user || !values.upstream) usage('resolve: --user and --upstream are required');
  return {
    user: values.user,
    upstream: values.upstream,
    target: values.target || process.env.CREDENTIAL_BROKER_SOCKET || DEFAULT_TARGET,
  };
}

function loadBrokerService() {
  const definition = protoLoader.loadSync('credentialbroker/v1/broker.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).credentialbroker.v1.CredentialBroker;
}

// notConnectedUrl returns the authorization URL of a NOT_CONNECTED ErrorInfo in
// the call's grpc-status-details-bin trailer, or undefined.
function notConnectedUrl(err) {
  const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw) return undefined;
  const root = new protobuf.Root().loadSync(
    [path.join(__dirname, 'protos', 'google', 'rpc', 'status.proto'), path.join(__dirname, 'protos', 'google', 'rpc', 'error_details.proto')],
    { keepCase: true },
  );
  const Status = root.lookupType('google.rpc.Status');
  const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
  for (const detail of Status.decode(raw).details) {
    if (detail.type_url.endsWith('/google.rpc.ErrorInfo')) {
      const info = ErrorInfo.decode(detail.value);
      if (info.domain === 'credentialbroker' && info.reason === 'NOT_CONNECTED') {
        return info.metadata.authorization_url || '';
      }
    }
  }
  return undefined;
}

function formatExpiry(ts) {
  if (!ts) return 'none';
  // RFC 3339, UTC, whole seconds: 2030-01-01T00:00:00Z
  return new Date(Number(ts.seconds) * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

function main() {
  const args = parse(process.argv.slice(2));
  const CredentialBroker = loadBrokerService();
  const client = new CredentialBroker(args.target, grpc.credentials.createInsecure());
  // The broker's SSRF guard requires this header from TCP callers; send it always.
  const metadata = new grpc.Metadata();
  metadata.set('x-credential-broker-request', 'true');
  const deadline = new Date(Date.now() + 10_000);

  client.Resolve({ user_id: args.user, upstream: args.upstream }, metadata, { deadline }, (err, resp) => {
    client.close();
    if (!err) {
      console.log(`OK ${resp.header_name} ${resp.token_type} ${formatExpiry(resp.expires_at)} token_len=${resp.access_token.length}`);
      process.exitCode = 0;
      return;
    }
    if (err.code === grpc.status.FAILED_PRECONDITION) {
      const url = notConnectedUrl(err);
      if (url !== undefined) {
        console.log(`NOT_CONNECTED ${url}`);
        process.exitCode = 3;
        return;
      }
    }
    console.log(grpc.status[err.code] || `CODE_${err.code}`);
    console.error(err.details);
    process.exitCode = 1;
  });
}

main();
