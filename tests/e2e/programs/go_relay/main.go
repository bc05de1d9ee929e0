// go_relay: a Go net/http server whose handlers call another HTTP server,
// or a client that makes requests; stdlib only. A server prints its port
// on stdout once listening.
//
//	go_relay [-upstream URL] [-tls] serve; /direct/P gets URL/direct/P from
//	                                the handler's goroutine, /spawned/P from
//	                                a goroutine the handler starts, and
//	                                answers what it got; other paths answer
//	                                "<path>\n", with status NNN for
//	                                /status/NNN, else 200
//	go_relay -get URL...            get each URL in turn on one keep-alive
//	                                connection, print "<status> <body>"
//
// -tls serves HTTPS with a self-signed certificate made at start; the client
// accepts any certificate. HTTP/2 is off on both sides: the probe parses
// HTTP/1.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

var client = &http.Client{Transport: &http.Transport{
	TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	TLSNextProto:    map[string]func(string, *tls.Conn) http.RoundTripper{},
}}

func get(url string) (int, string, error) {
	resp, err := client.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

func relay(upstream string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var status int
		var body string
		var err error
		switch {
		case strings.HasPrefix(r.URL.Path, "/direct/"):
			status, body, err = get(upstream + r.URL.Path)
		case strings.HasPrefix(r.URL.Path, "/spawned/"):
			done := make(chan struct{})
			go func() {
				status, body, err = get(upstream + r.URL.Path)
				close(done)
			}()
			<-done
		default:
			status, body = http.StatusOK, r.URL.Path+"\n"
			if code, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/status/")); err == nil {
				status = code
			}
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

func certificate() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	check(err)
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	check(err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func main() {
	upstream := flag.String("upstream", "", "base URL the handlers call")
	useTLS := flag.Bool("tls", false, "serve HTTPS")
	getMode := flag.Bool("get", false, "get the URLs given as arguments")
	flag.Parse()
	if *getMode {
		for _, url := range flag.Args() {
			status, body, err := get(url)
			check(err)
			fmt.Printf("%d %s", status, body)
		}
		return
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	server := &http.Server{
		Handler:      relay(*upstream),
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	if *useTLS {
		server.TLSConfig = &tls.Config{Certificates: []tls.Certificate{certificate()}}
		listener = tls.NewListener(listener, server.TLSConfig)
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	check(server.Serve(listener))
}
