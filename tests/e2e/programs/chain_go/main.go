// One service of a chain, on Go's net/http:
//
//	chain_go [-listen HOST:PORT] [-downstream URL]
//
// Prints its port once listening. A GET for PATH is passed on as a GET for the
// same PATH to -downstream (if given) with the default client (keep-alive),
// then answered 200. Knows nothing of tracing.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
)

func main() {
	listen := flag.String("listen", "0.0.0.0:0", "address to listen on")
	downstream := flag.String("downstream", "", "URL of the next service")
	flag.Parse()

	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		answer := ""
		if *downstream != "" {
			response, err := http.Get(*downstream + r.URL.RequestURI())
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			body, _ := io.ReadAll(response.Body)
			response.Body.Close()
			answer = fmt.Sprintf("%d %s", response.StatusCode, strings.TrimSpace(string(body)))
		}
		fmt.Fprintf(w, "go %s <- %s\n", r.URL.Path, answer)
	})
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	http.DefaultTransport.(*http.Transport).MaxIdleConnsPerHost = 64
	if err := http.Serve(listener, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
