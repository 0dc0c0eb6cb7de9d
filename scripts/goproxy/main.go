// goproxy: a TCP proxy that copies with io.Copy, which on Linux uses
// splice(2) between TCP connections (Go >= 1.22): the case the splice guard
// exists for. Standard library only.
//
//	goproxy LISTEN_ADDR UPSTREAM_ADDR
//	goproxy -version
package main

import (
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"runtime"
)

func main() {
	if len(os.Args) == 2 && os.Args[1] == "-version" {
		fmt.Println(runtime.Version())
		return
	}
	if len(os.Args) != 3 {
		log.Fatal("usage: goproxy LISTEN_ADDR UPSTREAM_ADDR")
	}
	listener, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	for {
		down, err := listener.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			defer down.Close()
			up, err := net.Dial("tcp", os.Args[2])
			if err != nil {
				log.Print(err)
				return
			}
			defer up.Close()
			done := make(chan struct{})
			go func() {
				io.Copy(up, down)
				up.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			io.Copy(down, up)
			down.(*net.TCPConn).CloseWrite()
			<-done
		}()
	}
}
