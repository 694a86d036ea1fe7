package main

// TLS mode (-tls): the streams over crypto/tls, one goroutine per stream.
//
// The epoll loop of stream.go reads raw descriptors, which TLS cannot use: the
// records have to go through crypto/tls. Here each stream is a goroutine that
// dials, does the handshake (InsecureSkipVerify: the bench's certificate is
// self-signed), sends its request, reads and checks the response head, then
// reads the body into a tally of its own with the same parser (chunked or
// close-delimited) and the same latency accounting. The tallies are merged
// once the receiver has stopped. At most -dialers streams are being opened at
// once (dial to response head), as in the epoll loop.
//
// Pinned to one core, the Go runtime runs the goroutines one at a time
// (GOMAXPROCS 1), so a read costs a goroutine switch through the runtime's
// netpoller on top of the read(2) and the decryption: more than in the epoll
// loop, which is fine for the 1,000-5,000 streams of the TLS scenarios.

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"
)

// tlsReadBuf is each stream's read buffer: a TLS record holds at most 16 KiB,
// and crypto/tls hands out what is left of a record on the next read.
const tlsReadBuf = 4096

// runTLS opens every connection, signals connected, then reads until stopped:
// the TLS counterpart of run.
func (r *receiver) runTLS(connected chan<- float64) {
	start := time.Now()
	host, _, err := net.SplitHostPort(r.cfg.addr)
	if err != nil {
		fail(err.Error())
	}
	conf := &tls.Config{InsecureSkipVerify: true, ServerName: host}
	r.tlsConns = make([]*tls.Conn, len(r.streams))
	tallies := make([]*tally, len(r.streams))
	var mu sync.Mutex          // the connect phase's figures, r.tlsConns, r.endErr
	var opened sync.WaitGroup  // until each stream has its head, or failed
	var running sync.WaitGroup // until each stream's goroutine has returned
	dialing := make(chan struct{}, r.cfg.dialers)
	for i := range r.streams {
		dialing <- struct{}{} // at most -dialers being opened at once
		s := &stream{started: time.Now(), firstData: true, fd: -1}
		t := &tally{scheduled: r.scheduled, counter: &r.received}
		if r.scheduled > 0 {
			s.seen = make([]uint64, (r.scheduled+63)/64)
			t.latencies = make([]uint32, 0, r.scheduled)
		}
		r.streams[i], tallies[i] = s, t
		opened.Add(1)
		running.Add(1)
		go func(i int) {
			defer running.Done()
			c, rest, err := r.openTLS(conf, r.streams[i])
			<-dialing
			mu.Lock()
			if err != nil {
				r.failed++
				if r.firstErr == "" {
					r.firstErr = err.Error()
				}
				r.streams[i].state = stDone
			} else {
				r.openMs = append(r.openMs, float64(time.Since(r.streams[i].started).Microseconds())/1000)
				r.tlsConns[i] = c
				if r.tlsState == "" {
					r.tlsState = describeTLS(c.ConnectionState())
				}
			}
			mu.Unlock()
			opened.Done()
			if err == nil {
				r.readTLS(c, r.streams[i], tallies[i], rest, &mu)
			}
		}(i)
	}
	opened.Wait()
	connected <- time.Since(start).Seconds()
	for !r.stop.Load() {
		time.Sleep(10 * time.Millisecond)
	}
	// Wake every reader without closing its connection: the clients leave
	// only when told to (closeAll), as in the epoll loop.
	mu.Lock()
	for _, c := range r.tlsConns {
		if c != nil {
			c.SetReadDeadline(time.Now())
		}
	}
	mu.Unlock()
	running.Wait()
	for _, t := range tallies {
		r.merge(t)
	}
}

// openTLS dials, does the handshake, sends the request and reads the response
// head within -head-timeout; it returns the connection and what followed the
// head.
func (r *receiver) openTLS(conf *tls.Config, s *stream) (*tls.Conn, []byte, error) {
	deadline := s.started.Add(r.cfg.headTimeout)
	raw, err := net.DialTimeout("tcp4", r.cfg.addr, r.cfg.headTimeout)
	if err != nil {
		return nil, nil, err
	}
	c := tls.Client(raw, conf)
	c.SetDeadline(deadline)
	if err := c.Handshake(); err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("TLS handshake: %v", err)
	}
	req := "GET " + r.cfg.eventsPath + " HTTP/1.1\r\nHost: " + r.host +
		"\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
	if _, err := c.Write([]byte(req)); err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("writing the request: %v", err)
	}
	s.state = stHead
	buf := make([]byte, tlsReadBuf)
	for {
		n, err := c.Read(buf)
		s.head = append(s.head, buf[:n]...)
		if end := bytes.Index(s.head, []byte("\r\n\r\n")); end >= 0 {
			rest := append([]byte(nil), s.head[end+4:]...)
			if err := s.checkHead(s.head[:end]); err != nil {
				raw.Close()
				return nil, nil, err
			}
			s.head = nil
			s.state = stBody
			c.SetDeadline(time.Time{})
			return c, rest, nil
		}
		if err != nil {
			raw.Close()
			return nil, nil, fmt.Errorf("reading the head: %v", err)
		}
	}
}

// readTLS parses a stream's body until the receiver stops or the connection
// ends (a disconnection, unless the receiver has stopped).
func (r *receiver) readTLS(c *tls.Conn, s *stream, t *tally, rest []byte, mu *sync.Mutex) {
	if len(rest) > 0 {
		t.now = time.Now().UnixNano()
		t.body(s, rest)
	}
	buf := make([]byte, tlsReadBuf)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			t.now = time.Now().UnixNano()
			t.body(s, buf[:n])
		}
		if err == nil {
			continue
		}
		if !r.stop.Load() {
			r.disconnect.Add(1)
			mu.Lock()
			if r.endErr == "" {
				r.endErr = err.Error()
			}
			mu.Unlock()
			s.state = stDone
		}
		return
	}
}

// closeTLS closes every TLS stream's TCP connection (no close_notify: like the
// epoll loop's close).
func (r *receiver) closeTLS() {
	for _, c := range r.tlsConns {
		if c != nil {
			c.NetConn().Close()
		}
	}
}

func describeTLS(st tls.ConnectionState) string {
	versions := map[uint16]string{
		tls.VersionTLS10: "TLS 1.0", tls.VersionTLS11: "TLS 1.1",
		tls.VersionTLS12: "TLS 1.2", tls.VersionTLS13: "TLS 1.3",
	}
	version, ok := versions[st.Version]
	if !ok {
		version = fmt.Sprintf("TLS 0x%04x", st.Version)
	}
	return version + " " + tls.CipherSuiteName(st.CipherSuite)
}
