// spdy-peer: the client half of kubelet's stream protocols over SPDY, built on
// the same SPDY library kubelet and client-go use (spdystream, from Debian's
// golang-github-docker-spdystream-dev), so that atoll-cri's streaming server is
// tested against a framing it did not write.
//
//	spdy-peer exec URL         stdin -> the command, its stdout/stderr -> ours;
//	                           exits with the command's code (remotecommand v4)
//	spdy-peer portforward URL PORT
//	                           stdin -> the port, the port -> stdout
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/docker/spdystream"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "spdy-peer: "+format+"\n", args...)
	os.Exit(120)
}

// dial upgrades a connection to URL to SPDY/3.1 with protocol.
func dial(raw, protocol string) *spdystream.Connection {
	u, err := url.Parse(raw)
	if err != nil {
		fail("%v", err)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		fail("%v", err)
	}
	req, _ := http.NewRequest("POST", raw, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	req.Header.Add("X-Stream-Protocol-Version", protocol)
	if err := req.Write(conn); err != nil {
		fail("%v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		fail("%v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		fail("HTTP %d: %s", resp.StatusCode, body)
	}
	if got := resp.Header.Get("X-Stream-Protocol-Version"); got != protocol {
		fail("the server chose %q", got)
	}
	s, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("%v", err)
	}
	go s.Serve(spdystream.NoOpStreamHandler)
	return s
}

func open(c *spdystream.Connection, h http.Header) *spdystream.Stream {
	s, err := c.CreateStream(h, nil, false)
	if err != nil {
		fail("%v", err)
	}
	if err := s.WaitTimeout(30 * time.Second); err != nil {
		fail("no reply to stream %v: %v", h, err)
	}
	return s
}

func exec(raw string) {
	c := dial(raw, "v4.channel.k8s.io")
	stream := func(kind string) *spdystream.Stream {
		h := http.Header{}
		h.Set("streamType", kind)
		return open(c, h)
	}
	errs := stream("error")
	stdin := stream("stdin")
	stdout := stream("stdout")
	stderr := stream("stderr")
	go func() {
		io.Copy(stdin, os.Stdin)
		stdin.Close()
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { io.Copy(os.Stdout, stdout); wg.Done() }()
	go func() { io.Copy(os.Stderr, stderr); wg.Done() }()
	status, err := io.ReadAll(errs)
	if err != nil {
		fail("reading the error stream: %v", err)
	}
	wg.Wait()
	c.Close()
	if len(status) == 0 {
		os.Exit(0)
	}
	var st struct {
		Status  string `json:"status"`
		Reason  string `json:"reason"`
		Message string `json:"message"`
		Details struct {
			Causes []struct {
				Reason  string `json:"reason"`
				Message string `json:"message"`
			} `json:"causes"`
		} `json:"details"`
	}
	if err := json.Unmarshal(status, &st); err != nil {
		fail("a bad status %q: %v", status, err)
	}
	if st.Status == "Success" {
		os.Exit(0)
	}
	if st.Reason == "NonZeroExitCode" {
		for _, cause := range st.Details.Causes {
			if cause.Reason == "ExitCode" {
				code, err := strconv.Atoi(cause.Message)
				if err == nil {
					os.Exit(code)
				}
			}
		}
	}
	fail("failed: %s", st.Message)
}

func portforward(raw, port string) {
	c := dial(raw, "portforward.k8s.io")
	h := http.Header{}
	h.Set("streamType", "error")
	h.Set("port", port)
	h.Set("requestID", "1")
	errs := open(c, h)
	h = http.Header{}
	h.Set("streamType", "data")
	h.Set("port", port)
	h.Set("requestID", "1")
	data := open(c, h)
	go func() {
		io.Copy(data, os.Stdin)
		data.Close()
	}()
	var msg []byte
	done := make(chan struct{})
	go func() { msg, _ = io.ReadAll(errs); close(done) }()
	io.Copy(os.Stdout, data)
	<-done
	c.Close()
	if len(msg) > 0 {
		fail("%s", msg)
	}
}

func main() {
	switch {
	case len(os.Args) == 3 && os.Args[1] == "exec":
		exec(os.Args[2])
	case len(os.Args) == 4 && os.Args[1] == "portforward":
		portforward(os.Args[2], os.Args[3])
	default:
		fail("usage: spdy-peer exec URL | spdy-peer portforward URL PORT")
	}
}
