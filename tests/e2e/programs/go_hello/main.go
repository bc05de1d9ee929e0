// go_hello: a Go program with neither net/http nor crypto/tls.
package main

import "fmt"

func main() {
	fmt.Println("hello")
}
