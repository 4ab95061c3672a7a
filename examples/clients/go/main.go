// Command cbclient is a minimal CredentialBroker client.
//
//	cbclient resolve --user U --upstream NAME [--target T]
//
// The target comes from --target, else $CREDENTIAL_BROKER_SOCKET
// (e.g. unix:///run/credential-broker/broker.sock), else 127.0.0.1:50051.
//
// Exit codes: 0 credential printed, 3 user not connected, 1 any other gRPC
// error, 2 usage error. The access token itself is never printed.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	cbv1 "cbclient/internal/gen/credentialbroker/v1"
)

const defaultTarget = "127.0.0.1:50051"

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 || args[0] != "resolve" {
		fmt.Fprintln(os.Stderr, "usage: cbclient resolve --user U --upstream NAME [--target T]")
		return 2
	}
	fs := flag.NewFlagSet("resolve", flag.ContinueOnError)
	user := fs.String("user", "", "user id")
	upstream := fs.String("upstream", "", "upstream name")
	target := fs.String("target", "", "broker address (default $CREDENTIAL_BROKER_SOCKET or "+defaultTarget+")")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if *user == "" || *upstream == "" {
		fmt.Fprintln(os.Stderr, "resolve: --user and --upstream are required")
		return 2
	}
	if *target == "" {
		*target = os.Getenv("CREDENTIAL_BROKER_SOCKET")
	}
	if *target == "" {
		*target = defaultTarget
	}

	conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "resolve:", err)
		return 1
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The broker's SSRF guard requires this header from TCP callers; send it always.
	ctx = metadata.AppendToOutgoingContext(ctx, "x-credential-broker-request", "true")

	resp, err := cbv1.NewCredentialBrokerClient(conn).Resolve(ctx, &cbv1.ResolveRequest{
		UserId:   *user,
		Upstream: *upstream,
	})
	if err != nil {
		return report(err)
	}
	expires := "none"
	if resp.GetExpiresAt() != nil {
		expires = resp.GetExpiresAt().AsTime().UTC().Format(time.RFC3339)
	}
	fmt.Printf("OK %s %s %s token_len=%d\n", resp.GetHeaderName(), resp.GetTokenType(), expires, len(resp.GetAccessToken()))
	return 0
}

// report prints a failed call: NOT_CONNECTED plus the URL that connects the
// user (exit 3), or the status code name (exit 1).
func report(err error) int {
	st, _ := status.FromError(err)
	if st.Code() == codes.FailedPrecondition {
		for _, detail := range st.Details() {
			info, ok := detail.(*errdetails.ErrorInfo)
			if ok && info.GetDomain() == "credentialbroker" && info.GetReason() == "NOT_CONNECTED" {
				fmt.Printf("NOT_CONNECTED %s\n", info.GetMetadata()["authorization_url"])
				return 3
			}
		}
	}
	fmt.Println(codeName(st.Code()))
	fmt.Fprintln(os.Stderr, st.Message())
	return 1
}

// codeName returns the canonical gRPC name (FAILED_PRECONDITION), which
// codes.Code.String() spells differently (FailedPrecondition).
func codeName(c codes.Code) string {
	names := [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
		"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
		"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
		"UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
	if int(c) < len(names) {
		return names[c]
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}
