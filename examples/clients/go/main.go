// Command cbclient is a minimal CredentialBroker client, built on the Go SDK (clients/go).
//
//	cbclient resolve --user U --upstream NAME [--target T]
//
// The target comes from --target, else $CREDENTIAL_BROKER_SOCKET
// (e.g. unix:///run/credential-broker/broker.sock), else 127.0.0.1:50051.
// The SDK sends the request header, reads the ErrorInfo and retries UNAVAILABLE
// within the call's deadline.
//
// Exit codes: 0 credential printed, 3 user not connected, 1 any other error,
// 2 usage error. The access token itself is never printed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"credentialbroker"
)

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
	target := fs.String("target", "", "broker address (default $CREDENTIAL_BROKER_SOCKET or "+credentialbroker.DefaultTarget+")")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if *user == "" || *upstream == "" {
		fmt.Fprintln(os.Stderr, "resolve: --user and --upstream are required")
		return 2
	}

	client, err := credentialbroker.New(*target)
	if err != nil {
		fmt.Fprintln(os.Stderr, "resolve:", err)
		return 1
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cred, err := client.Resolve(ctx, *user, *upstream)
	if err != nil {
		return report(err)
	}
	expires := "none"
	if !cred.ExpiresAt.IsZero() {
		expires = cred.ExpiresAt.UTC().Format(time.RFC3339)
	}
	fmt.Printf("OK %s %s %s token_len=%d\n", cred.HeaderName, cred.TokenType, expires, len(cred.AccessToken))
	return 0
}

// report prints a failed call: NOT_CONNECTED plus the URL that connects the
// user (exit 3), or the status code name (exit 1).
func report(err error) int {
	var notConnected *credentialbroker.NotConnectedError
	if errors.As(err, &notConnected) {
		fmt.Printf("NOT_CONNECTED %s\n", notConnected.AuthorizationURL)
		return 3
	}
	var be *credentialbroker.BrokerError
	if errors.As(err, &be) {
		fmt.Println(codeName(be))
		fmt.Fprintln(os.Stderr, be.Message)
		return 1
	}
	fmt.Println("UNKNOWN")
	fmt.Fprintln(os.Stderr, err)
	return 1
}

// codeName is the gRPC status code's canonical name (UNAVAILABLE, FAILED_PRECONDITION...).
func codeName(be *credentialbroker.BrokerError) string {
	return credentialbroker.CodeName(be.Code)
}
