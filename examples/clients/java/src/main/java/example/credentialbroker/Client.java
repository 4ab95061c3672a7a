package example.credentialbroker;

import com.google.rpc.ErrorInfo;
import credentialbroker.v1.Broker.ResolveRequest;
import credentialbroker.v1.Broker.ResolveResponse;
import credentialbroker.v1.CredentialBrokerGrpc;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import java.time.Instant;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * Minimal CredentialBroker client.
 *
 * <pre>java -jar target/cbclient.jar resolve --user U --upstream NAME [--target T]</pre>
 *
 * <p>The target comes from --target, else $CREDENTIAL_BROKER_SOCKET (e.g.
 * unix:///run/credential-broker/broker.sock), else 127.0.0.1:50051.
 *
 * <p>Exit codes: 0 credential printed, 3 user not connected, 1 any other gRPC error, 2 usage
 * error. The access token itself is never printed.
 */
public final class Client {
  private static final String DEFAULT_TARGET = "127.0.0.1:50051";
  private static final Metadata.Key<String> REQUEST_HEADER =
      Metadata.Key.of("x-credential-broker-request", Metadata.ASCII_STRING_MARSHALLER);

  private Client() {}

  public static void main(String[] args) throws InterruptedException {
    System.exit(run(args));
  }

  static int run(String[] args) throws InterruptedException {
    Map<String, String> flags = new HashMap<>();
    if (args.length == 0 || !args[0].equals("resolve")) {
      return usage(null);
    }
    for (int i = 1; i < args.length; i += 2) {
      if (!args[i].startsWith("--") || i + 1 >= args.length) {
        return usage("resolve: bad argument " + args[i]);
      }
      flags.put(args[i].substring(2), args[i + 1]);
    }
    String user = flags.get("user");
    String upstream = flags.get("upstream");
    if (user == null || upstream == null) {
      return usage("resolve: --user and --upstream are required");
    }
    String target = flags.get("target");
    if (target == null || target.isEmpty()) {
      target = System.getenv("CREDENTIAL_BROKER_SOCKET");
    }
    if (target == null || target.isEmpty()) {
      target = DEFAULT_TARGET;
    }

    // The broker's SSRF guard requires this header from TCP callers; send it always.
    Metadata headers = new Metadata();
    headers.put(REQUEST_HEADER, "true");
    ManagedChannel channel =
        Grpc.newChannelBuilder(target, InsecureChannelCredentials.create()).build();
    try {
      CredentialBrokerGrpc.CredentialBrokerBlockingStub stub =
          CredentialBrokerGrpc.newBlockingStub(channel)
              .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
              .withDeadlineAfter(10, TimeUnit.SECONDS);
      ResolveResponse resp =
          stub.resolve(ResolveRequest.newBuilder().setUserId(user).setUpstream(upstream).build());
      String expires =
          resp.hasExpiresAt()
              ? Instant.ofEpochSecond(resp.getExpiresAt().getSeconds()).toString()
              : "none";
      System.out.printf(
          "OK %s %s %s token_len=%d%n",
          resp.getHeaderName(), resp.getTokenType(), expires, resp.getAccessToken().length());
      return 0;
    } catch (StatusRuntimeException e) {
      return report(e);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  /** Prints NOT_CONNECTED and the URL that connects the user (3), or the status code name (1). */
  private static int report(StatusRuntimeException e) {
    Status.Code code = e.getStatus().getCode();
    com.google.rpc.Status status = StatusProto.fromThrowable(e);
    if (code == Status.Code.FAILED_PRECONDITION && status != null) {
      for (com.google.protobuf.Any detail : status.getDetailsList()) {
        if (!detail.is(ErrorInfo.class)) {
          continue;
        }
        try {
          ErrorInfo info = detail.unpack(ErrorInfo.class);
          if (info.getDomain().equals("credentialbroker")
              && info.getReason().equals("NOT_CONNECTED")) {
            System.out.println(
                "NOT_CONNECTED " + info.getMetadataOrDefault("authorization_url", ""));
            return 3;
          }
        } catch (com.google.protobuf.InvalidProtocolBufferException ignored) {
          // A malformed detail is treated like any other error below.
        }
      }
    }
    System.out.println(code.name());
    System.err.println(e.getStatus().getDescription());
    return 1;
  }

  private static int usage(String message) {
    if (message != null) {
      System.err.println(message);
    }
    System.err.println("usage: cbclient resolve --user U --upstream NAME [--target T]");
    return 2;
  }
}
