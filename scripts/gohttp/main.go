// gohttp: a net/http file server (Go's netpoller: non-blocking sockets,
// edge-triggered epoll), for the mixed setups of scripts/real-programs.sh.
// Standard library only.
//
//	gohttp LISTEN_ADDR DIR
package main

import (
	"log"
	"net/http"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		log.Fatal("usage: gohttp LISTEN_ADDR DIR")
	}
	log.Fatal(http.ListenAndServe(os.Args[1], http.FileServer(http.Dir(os.Args[2]))))
}
