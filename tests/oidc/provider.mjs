// A real, independently written OpenID provider (the `oidc-provider` package) for the broker's
// integration tests, on a loopback port.
//
//   node provider.mjs PORT
//
// Environment (set by tests/oidc_provider.py; nothing secret is written to disk or committed):
//   OIDC_CLIENTS  JSON list of {"client_id", "client_secret", "redirect_uri", "always_refresh"}
//                 (optionally "jwks": the client authenticates with private_key_jwt, RFC 7523, signed
//                 by a key of that public JWK set instead of a secret; and "require_par": its
//                 authorization requests must be pushed first, RFC 9126):
//                 confidential web clients (client_secret_basic) allowed the authorization_code
//                 and refresh_token grants. A client gets a refresh token when its grant includes
//                 offline_access (OpenID Connect Core 1.0 section 11; this provider honours
//                 offline_access only when the request also says prompt=consent), or, with
//                 "always_refresh": true, on every code grant: the policy of providers that issue
//                 refresh tokens to confidential clients whatever the scope.
//   OIDC_COOKIE_KEY  the key that signs the provider's cookies.
//
// Features the tests rely on: PKCE required (S256), refresh tokens only when offline_access was
// granted, refresh token rotation on every use with reuse detection (a consumed refresh token
// presented again revokes its grant), RFC 7009 revocation, RFC 7662 introspection, RFC 9207 `iss`
// on the authorization response, and the development login/consent pages (devInteractions),
// which a test drives by posting their forms. One line "ready ISSUER" on stdout means it serves.
// Every token and code it mints is then written to stdout as "minted KIND VALUE": the test
// harness reads them so that the suite's leak check looks for each one in the broker's logs,
// errors and database.
import Provider from 'oidc-provider';

const port = Number.parseInt(process.argv[2] ?? process.env.OIDC_PORT ?? '', 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node provider.mjs PORT (a free loopback port)');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;

let clients;
try {
  clients = JSON.parse(process.env.OIDC_CLIENTS ?? '');
} catch {
  console.error('OIDC_CLIENTS must be a JSON list of clients');
  process.exit(2);
}
const cookieKey = process.env.OIDC_COOKIE_KEY;
if (!Array.isArray(clients) || clients.length === 0 || !cookieKey) {
  console.error('OIDC_CLIENTS (a non-empty JSON list) and OIDC_COOKIE_KEY are required');
  process.exit(2);
}

const alwaysRefresh = new Set(clients.filter((c) => c.always_refresh).map((c) => c.client_id));

const configuration = {
  clients: clients.map((c) => ({
    client_id: c.client_id,
    ...(c.jwks
      ? { jwks: c.jwks, token_endpoint_auth_method: 'private_key_jwt' }
      : { client_secret: c.client_secret, token_endpoint_auth_method: 'client_secret_basic' }),
    require_pushed_authorization_requests: Boolean(c.require_par),
    redirect_uris: [c.redirect_uri],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
  })),
  // `api:read` stands for an API scope a resource owner can grant next to the OpenID ones.
  scopes: ['openid', 'offline_access', 'api:read'],
  claims: { openid: ['sub'] },
  cookies: { keys: [cookieKey] },
  features: {
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
  },
  pkce: { required: () => true },
  issueRefreshToken: async (ctx, client, code) =>
    client.grantTypeAllowed('refresh_token')
    && (code.scopes.has('offline_access') || alwaysRefresh.has(client.clientId)),
  // Rotate on every use; a consumed refresh token presented again revokes the whole grant.
  rotateRefreshToken: true,
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 60,
    Grant: 3600,
    IdToken: 3600,
    Interaction: 600,
    RefreshToken: 86400,
    Session: 3600,
  },
  findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
};

const provider = new Provider(issuer, configuration);
// Errors the provider answers with are expected in these tests; keep stderr for real faults.
provider.on('server_error', (ctx, err) => console.error('server_error', err));

// Opaque tokens and codes: the value handed out is the model's jti.
for (const [event, kind] of [
  ['access_token.saved', 'access_token'],
  ['refresh_token.saved', 'refresh_token'],
  ['authorization_code.saved', 'code'],
]) {
  provider.on(event, (token) => console.log(`minted ${kind} ${token.jti}`));
}

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
server.on('error', (err) => {
  console.error(`cannot listen on 127.0.0.1:${port}: ${err.code ?? err.message}`);
  process.exit(1);
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
