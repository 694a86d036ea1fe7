package main

// Frozen connections: they read the response head and then nothing, like a
// browser tab that the OS froze. The server's send buffer and then its queue
// for them fill up, until its write deadline closes them.

import (
	"syscall"
	"time"
)

// isFrozen spreads the -frozen connections evenly among the -conns others in
// the order of opening (with 1,000 and 100: every 11th), so that they sit all
// along the server's fan-out loop rather than at one end.
func (r *receiver) isFrozen(i int) bool {
	frozen, total := r.cfg.frozen, r.cfg.conns+r.cfg.frozen
	return frozen > 0 && (i+1)*frozen/total > i*frozen/total
}

// frozenOptions sets a frozen connection's socket options, before connect:
// the window and the MSS offered in the handshake follow them.
//
// The MSS matters on loopback: the server's kernel sizes a connection's send
// buffer from its MSS (tcp_sndbuf_expand: twice the initial window of 10
// segments), and loopback's MSS of ~64 KiB grows it to the tcp_wmem maximum,
// 4 MiB here, which holds a minute of 50 events/s of 1 KiB before the
// server's send() would ever block. With Ethernet's 1,460 bytes the buffer is
// tens of KiB, as for a frozen browser tab on a real network, and the server
// meets the frozen reader within a second or so.
func (r *receiver) frozenOptions(fd int) error {
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, r.cfg.frozenBuf); err != nil {
		return err
	}
	if r.cfg.frozenMSS > 0 {
		return syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, r.cfg.frozenMSS)
	}
	return nil
}

// freeze stops watching a frozen connection once its head has arrived: the
// loop never reads it again.
func (r *receiver) freeze(s *stream) {
	syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_DEL, s.fd, nil)
	r.frozenOpened++
}

// frozenOpen lists the frozen connections whose head arrived.
func (r *receiver) frozenOpen() []*stream {
	var out []*stream
	for _, s := range r.streams {
		if s != nil && s.frozen && s.state == stBody && s.fd > 0 {
			out = append(out, s)
		}
	}
	return out
}

// peekFrozen adds to the "done" result what can be told without reading: how
// many frozen connections already received FIN or RST. A server that closed a
// frozen connection with data still unsent has its FIN queued behind that
// data, which the client's full receive window holds back, so such a close is
// usually invisible here: "frozen_closed_by_server" is then "unknown" (the
// "frozen" phase and the server's own metrics tell).
func (r *receiver) peekFrozen(result map[string]any) {
	if r.cfg.frozen == 0 {
		return
	}
	open := r.frozenOpen()
	seen := 0
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fail("epoll_create1: " + err.Error())
	}
	defer syscall.Close(epfd)
	for _, s := range open {
		ev := syscall.EpollEvent{Events: syscall.EPOLLRDHUP, Fd: int32(s.fd)}
		syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, s.fd, &ev)
	}
	events := make([]syscall.EpollEvent, len(open)+1)
	n, _ := syscall.EpollWait(epfd, events, 0)
	for i := 0; i < n; i++ {
		if events[i].Events&(syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
			seen++
		}
	}
	result["frozen_opened"] = r.frozenOpened
	result["frozen_closed_seen"] = seen
	if seen == len(open) {
		result["frozen_closed_by_server"] = seen
	} else {
		result["frozen_closed_by_server"] = "unknown"
	}
}

// probeFrozen reads every frozen connection to its end, once the measurement
// is over: a connection the server closed gives its backlog, then EOF (or
// ECONNRESET once the server's side is gone); one still open gives its backlog
// and then silence. A connection that is still sending when limit passes is
// "unknown". Reading is level-triggered, one read per readiness, like the
// receiver's loop.
func (r *receiver) probeFrozen(idle, limit time.Duration) map[string]any {
	start := time.Now()
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fail("epoll_create1: " + err.Error())
	}
	defer syscall.Close(epfd)
	type probe struct {
		s    *stream
		last time.Time // of the last byte read
	}
	pending := map[int32]*probe{}
	for _, s := range r.frozenOpen() {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(s.fd)}
		if syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, s.fd, &ev) == nil {
			pending[int32(s.fd)] = &probe{s: s, last: start}
		}
	}
	opened := len(pending)
	eof, reset, otherErr := 0, 0, 0
	firstErr := ""
	var bytesRead int64
	events := make([]syscall.EpollEvent, 256)
	for len(pending) > 0 && time.Since(start) < limit {
		n, err := syscall.EpollWait(epfd, events, 50)
		if err != nil && err != syscall.EINTR {
			fail("epoll_wait: " + err.Error())
		}
		now := time.Now()
		for i := 0; i < n; i++ {
			p := pending[events[i].Fd]
			if p == nil {
				continue
			}
			got, err := syscall.Read(p.s.fd, r.buf)
			if got > 0 {
				bytesRead += int64(got)
				p.last = now
				continue
			}
			if err == syscall.EAGAIN || err == syscall.EINTR {
				continue
			}
			switch {
			case err == nil:
				eof++
			case err == syscall.ECONNRESET:
				reset++
			default:
				otherErr++
				if firstErr == "" {
					firstErr = err.Error()
				}
			}
			syscall.EpollCtl(epfd, syscall.EPOLL_CTL_DEL, p.s.fd, nil)
			delete(pending, events[i].Fd)
		}
		quiet := true
		for _, p := range pending {
			if now.Sub(p.last) < idle {
				quiet = false
				break
			}
		}
		if quiet {
			break
		}
	}
	stillOpen, unknown := 0, 0
	for _, p := range pending {
		if time.Since(p.last) >= idle {
			stillOpen++
		} else {
			unknown++
		}
	}
	return map[string]any{
		"phase":            "frozen",
		"opened":           opened,
		"closed_by_server": eof + reset + otherErr,
		"eof":              eof,
		"reset":            reset,
		"other_errors":     otherErr,
		"first_error":      firstErr,
		"still_open":       stillOpen,
		"unknown":          unknown,
		"bytes_read":       bytesRead,
		"probe_seconds":    time.Since(start).Seconds(),
	}
}
