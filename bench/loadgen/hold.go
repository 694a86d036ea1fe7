package main

// Hold mode (-mode hold): the streams stay open and the caller drives them
// with commands on stdin, one per line, each answered by one JSON line.
//
//	publish  publishes -rate events/s for -duration to the streams' channel
//	         (c0 with -channels 1, else the server's default), waits for their
//	         deliveries (at most -drain after the last publish) and reports
//	         that window's latency: "published".
//	arm      notes the deliveries so far: "armed". The caller then sends one
//	         event to every stream itself (a broadcast), its data stamped
//	         "<unix-nanos> <seq> ..." like the load generator's own events,
//	         with a seq below -seqs that no publish window uses (they count
//	         up from 0).
//	await    waits until every open stream has one more delivery than at
//	         "arm" (at most -drain) and reports those deliveries' latency, the
//	         last stream's being the maximum: "awaited".
//	close    (or end of input) closes every stream and exits.
//
// Several load generators may hold one server's streams between them: here a
// process may have at most 20,000 open files, and one source address gives
// about 28,000 ephemeral ports. -src gives each its own source address on
// loopback (127.0.0.x), so that the ports never run short.

import (
	"bufio"
	"math"
	"sort"
	"strings"
	"syscall"
	"time"
)

// ipBindAddressNoPort is Linux's IP_BIND_ADDRESS_NO_PORT (not in package
// syscall): bind(2) takes the address and leaves the port to connect(2), which
// may then reuse a port that another connection has to a different peer.
const ipBindAddressNoPort = 24

// bindSource binds a stream's socket to the -src address before connect.
func bindSource(fd int, src *syscall.SockaddrInet4) error {
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_IP, ipBindAddressNoPort, 1); err != nil {
		return err
	}
	return syscall.Bind(fd, src)
}

// snapshot is what the loop hands over on "snapshot": the latencies (µs) of
// the deliveries since the previous snapshot, and the tally's counts so far.
type snapshot struct {
	latencies []uint32
	unique    int64
	dups      int64
	lastRecv  int64
}

// takeSnapshot runs in the loop goroutine, which owns the tally.
func (r *receiver) takeSnapshot() snapshot {
	s := snapshot{
		latencies: append([]uint32(nil), r.latencies[r.mark:]...),
		unique:    r.unique,
		dups:      r.dups,
		lastRecv:  r.lastRecv,
	}
	r.mark = len(r.latencies)
	return s
}

// snapshot asks the running loop for the deliveries since the last snapshot.
func (r *receiver) snapshot() snapshot {
	r.cmd <- "snapshot"
	return <-r.snap
}

func millis(us []uint32) []float64 {
	out := make([]float64, len(us))
	for i, v := range us {
		out[i] = float64(v) / 1000
	}
	sort.Float64s(out)
	return out
}

func hold(cfg config, r *receiver, connected int, stdin *bufio.Reader) {
	open := func() int64 { return int64(connected) - r.disconnect.Load() }
	nextSeq := 0
	var armed snapshot
	for {
		line, err := stdin.ReadString('\n')
		cmd := strings.TrimSpace(line)
		if cmd == "" && err != nil || cmd == "close" {
			return
		}
		switch cmd {
		case "publish":
			emit(holdPublish(cfg, r, open, &nextSeq))
		case "arm":
			armed = r.snapshot()
			emit(map[string]any{"phase": "armed", "open": open()})
		case "await":
			want := open()
			waitReceived(r, armed.unique+want, time.Now().Add(cfg.drain))
			snap := r.snapshot()
			emit(map[string]any{
				"phase":        "awaited",
				"open":         open(),
				"expected":     want,
				"received":     len(snap.latencies),
				"duplicates":   snap.dups - armed.dups,
				"latency_ms":   percentiles(millis(snap.latencies)),
				"last_recv_ns": snap.lastRecv,
			})
		default:
			fail("hold: unknown command " + cmd)
		}
	}
}

// holdPublish is one publish window: -rate events/s for -duration.
func holdPublish(cfg config, r *receiver, open func() int64, nextSeq *int) map[string]any {
	n := int(math.Round(cfg.rate * cfg.duration.Seconds()))
	if n < 1 || *nextSeq+n > r.scheduled {
		fail("hold: publish needs -rate > 0 and seqs left under -seqs")
	}
	base := *nextSeq
	*nextSeq += n
	before := r.snapshot()
	url := publishURL(cfg, defaultChannel(cfg))
	streams := open()
	st := publish(cfg, plan{
		n:        n,
		interval: time.Duration(float64(time.Second) / cfg.rate),
		cutoff:   2 * cfg.duration,
		url:      func(int) string { return url },
		seq:      func(i int) int { return base + i },
	})
	expected := int64(st.ok) * streams
	waitReceived(r, before.unique+expected, st.end.Add(cfg.drain))
	snap := r.snapshot()
	sort.Float64s(st.lagMs)
	return map[string]any{
		"phase":               "published",
		"streams":             streams,
		"scheduled":           n,
		"published":           st.ok,
		"publish_errors":      st.errors,
		"first_publish_error": st.firstErr,
		"publish_seconds":     st.end.Sub(st.start).Seconds(),
		"publish_lag_ms":      percentiles(st.lagMs),
		"expected":            expected,
		"received":            len(snap.latencies),
		"duplicates":          snap.dups - before.dups,
		"latency_ms":          percentiles(millis(snap.latencies)),
		"disconnected":        r.disconnect.Load(),
	}
}
