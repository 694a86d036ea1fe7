package main

// Scale-out modes: several server processes, many channels, a reconnect storm.
//
// -addrs host:port,host:port spreads the streams over several servers (stream
// i connects to address i mod n) while -addr is where the events are
// published. -channels N puts stream i on channel c<i mod N> (the query
// ?channel=c<i mod N>; N = 0: no query at all, the servers' default channel).
//
// -mode perchannel publishes one event (seq 0) to every channel c0..c<N-1>,
// from -publishers connections as fast as they go, and waits until every
// stream has its event: the time from the first publish to the last delivery.
//
// -mode storm publishes -pre events at -rate (every stream records the id of
// the last event it read), closes every open stream at once, publishes
// -missed events at -rate while they are away, then opens them all again at
// once (-dialers: how many are being opened at a time; default all) with
// Last-Event-ID, each on address (i + -storm-shift) mod n: with two servers
// and a shift of 1, every client resumes on the other server. It then waits
// (at most -replay-limit) until every stream has every seq: the time from the
// reconnect to the last stream's full replay, the events lost (a seq a stream
// never got), duplicated (a seq it got twice, over either connection), and
// the reset events and failed reconnects. A stream that the server closes
// after the reconnect comes back (with Last-Event-ID, on the same address)
// after the retry field the server sent, or 3 s without one, as an
// EventSource would; "retried" counts those second reconnects.

import (
	"net"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// streamAddrs parses -addrs (default: -addr alone).
func (r *receiver) streamAddrs(addrs string) error {
	if addrs == "" {
		r.sas = []syscall.SockaddrInet4{r.sa}
		return nil
	}
	for _, a := range strings.Split(addrs, ",") {
		addr, err := net.ResolveTCPAddr("tcp4", strings.TrimSpace(a))
		if err != nil {
			return err
		}
		sa := syscall.SockaddrInet4{Port: addr.Port}
		copy(sa.Addr[:], addr.IP.To4())
		r.sas = append(r.sas, sa)
	}
	return nil
}

func (r *receiver) addrOf(s *stream) *syscall.SockaddrInet4 {
	if s.live {
		return &r.sas[s.idx%len(r.sas)]
	}
	return &r.sas[(s.idx+r.shift)%len(r.sas)]
}

func channelName(i int) string { return "c" + strconv.Itoa(i) }

// query is the stream's query string: its channel, if -channels is set.
func (r *receiver) query(s *stream) string {
	if s.live {
		return "?channel=" + r.cfg.liveChannel
	}
	if r.cfg.channels <= 0 {
		return ""
	}
	return "?channel=" + channelName(s.idx%r.cfg.channels)
}

// dropAll closes every open stream (the storm's disconnect): those reconnect.
func (r *receiver) dropAll() {
	r.wantedN = 0
	for _, s := range r.streams {
		if s != nil && s.state == stBody && !s.frozen {
			s.wanted = true
			r.wantedN++
			r.finish(s)
		}
	}
}

// reopen readies a stream that the storm closed for its reconnect; false for
// one that is not to reconnect (it never opened).
func (s *stream) reopen() bool {
	if !s.wanted {
		return false
	}
	s.started = time.Now()
	s.state = stConnecting
	s.head = nil
	s.chunked, s.chState, s.chLeft, s.chSizeBuf = false, chSize, 0, s.chSizeBuf[:0]
	s.line = s.line[:0]
	s.firstData, s.stamped, s.hasPending = true, false, false
	return true
}

// defaultRetry is how long a stream waits to reopen after the server closed
// it when the server sent no retry field (browsers wait about 3 s).
const defaultRetry = 3 * time.Second

type redial struct {
	s  *stream
	at time.Time
}

// retryLater reopens s after its retry delay: during the storm's replay the
// clients behave as an EventSource does when the server closes its stream.
func (r *receiver) retryLater(s *stream) {
	delay := defaultRetry
	if s.retryMs > 0 {
		delay = time.Duration(s.retryMs) * time.Millisecond
	}
	r.redial = append(r.redial, redial{s, time.Now().Add(delay)})
}

// redialDue reopens the streams whose retry delay has passed.
func (r *receiver) redialDue() {
	now := time.Now()
	keep := r.redial[:0]
	for _, d := range r.redial {
		if now.Before(d.at) || !d.s.reopen() {
			if now.Before(d.at) {
				keep = append(keep, d)
			}
			continue
		}
		r.retried++
		r.dial(d.s)
	}
	r.redial = keep
}

// fields notes an event's id and retry, and counts reset events (storm only).
func (t *tally) fields(s *stream, line []byte) {
	if len(line) >= 6 && string(line[:6]) == "retry:" {
		if ms, err := strconv.ParseInt(strings.TrimSpace(string(line[6:])), 10, 64); err == nil {
			s.retryMs = ms
		}
		return
	}
	if len(line) >= 3 && string(line[:3]) == "id:" {
		v := line[3:]
		if len(v) > 0 && v[0] == ' ' {
			v = v[1:]
		}
		s.pendingID, s.hasPending = string(v), true
		return
	}
	if v := strings.TrimPrefix(string(line), "event:"); len(v) < len(line) && strings.TrimSpace(v) == "reset" {
		t.resets++
	}
}

// publishURL is where events for channel ch are posted ("" for no channel).
func publishURL(cfg config, ch string) string {
	scheme := "http://"
	if cfg.tls {
		scheme = "https://"
	}
	url := scheme + cfg.addr + cfg.publishPath
	if ch != "" {
		url += "?channel=" + ch
	}
	return url
}

// defaultChannel is what the broadcast modes publish to: c0 with -channels.
func defaultChannel(cfg config) string {
	if cfg.channels > 0 {
		return channelName(0)
	}
	return ""
}

// waitReceived waits until r.received reaches want or deadline passes.
func waitReceived(r *receiver, want int64, deadline time.Time) {
	for r.received.Load() < want && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// perChannel: one event to every channel, as fast as the publishers go.
func perChannel(cfg config, r *receiver, connected int, stopped <-chan struct{}) map[string]any {
	n := cfg.channels
	if n < 1 {
		n = 1
	}
	// Subscribers of each channel, among the streams that opened.
	subs := make([]int64, n)
	for _, s := range r.streams {
		if s != nil && s.state == stBody && !s.frozen {
			subs[s.idx%n]++
		}
	}
	st := publish(cfg, plan{
		n:   n,
		url: func(i int) string { return publishURL(cfg, channelName(i)) },
		seq: func(int) int { return 0 },
	})
	var expected int64
	for i, ok := range st.okAt {
		if ok {
			expected += subs[i]
		}
	}
	waitReceived(r, expected, st.end.Add(cfg.drain))
	r.stop.Store(true)
	<-stopped
	result := deliveryResult(cfg, r, st, expected, connected)
	result["mode"] = "perchannel"
	result["channels"] = n
	allSeconds := 0.0
	if r.lastRecv > 0 {
		allSeconds = float64(r.lastRecv-st.start.UnixNano()) / 1e9
	}
	result["all_delivered_seconds"] = allSeconds
	return result
}

// storm: publish, disconnect everyone, publish, everyone reconnects at once.
func storm(cfg config, r *receiver, connected int, connectedCh <-chan float64, stopped <-chan struct{}) map[string]any {
	interval := time.Duration(float64(time.Second) / cfg.rate)
	ch := defaultChannel(cfg)
	url := func(int) string { return publishURL(cfg, ch) }
	pre := publish(cfg, plan{n: cfg.pre, interval: interval, url: url, seq: func(i int) int { return i }})
	waitReceived(r, int64(pre.ok)*int64(connected), pre.end.Add(cfg.drain))
	receivedBefore := r.received.Load()
	r.cmd <- "disconnect"
	<-r.ack
	wanted := r.wantedN
	time.Sleep(cfg.stormPause) // the servers see the closes
	missed := publish(cfg, plan{
		n: cfg.missed, interval: interval, url: url, seq: func(i int) int { return cfg.pre + i },
	})
	time.Sleep(cfg.stormPause)
	r.shift, r.resume = cfg.stormShift, true // read by the loop after the command
	t0 := time.Now()
	r.cmd <- "reconnect"
	acceptSeconds := <-connectedCh
	expected := int64(pre.ok+missed.ok) * int64(wanted)
	waitReceived(r, expected, time.Now().Add(cfg.replayLimit))
	r.stop.Store(true)
	<-stopped
	var done []float64
	for _, ns := range r.completions {
		if ns >= t0.UnixNano() {
			done = append(done, float64(ns-t0.UnixNano())/1e6)
		}
	}
	sort.Float64s(done)
	complete := int64(len(done))
	replaySeconds := -1.0 // not every stream got all
	if complete == int64(wanted) && len(done) > 0 {
		replaySeconds = done[len(done)-1] / 1000
	}
	pubErr := pre.firstErr
	if pubErr == "" {
		pubErr = missed.firstErr
	}
	return map[string]any{
		"phase":                  "done",
		"mode":                   "storm",
		"connected":              connected,
		"scheduled":              cfg.pre + cfg.missed,
		"published":              pre.ok + missed.ok,
		"published_pre":          pre.ok,
		"published_missed":       missed.ok,
		"publish_errors":         pre.errors + missed.errors,
		"first_publish_error":    pubErr,
		"received_before":        receivedBefore,
		"reconnecting":           wanted,
		"reconnect_failed":       r.failed,
		"first_reconnect_error":  r.firstErr,
		"reconnect_seconds":      acceptSeconds,
		"reconnect_open_ms":      percentiles(sortedCopy(r.openMs)),
		"expected":               expected,
		"received":               r.unique,
		"lost":                   expected - r.unique,
		"duplicates":             r.dups,
		"resets":                 r.resets,
		"complete_streams":       complete,
		"replay_seconds":         replaySeconds,
		"replay_done_ms":         percentiles(done),
		"disconnected":           r.disconnect.Load(),
		"first_disconnect_error": r.endErr,
		"retried":                r.retried,
		"retry_pending":          len(r.redial),
	}
}

func sortedCopy(v []float64) []float64 {
	out := append([]float64(nil), v...)
	sort.Float64s(out)
	return out
}

// deliveryResult is the "done" line's figures of deliveries and latency.
func deliveryResult(cfg config, r *receiver, st publishStats, expected int64, connected int) map[string]any {
	lat := make([]float64, len(r.latencies))
	for i, us := range r.latencies {
		lat[i] = float64(us) / 1000
	}
	sort.Float64s(lat)
	sort.Float64s(st.lagMs)
	loss := 0.0
	if expected > 0 {
		loss = 1 - float64(r.unique)/float64(expected)
	}
	return map[string]any{
		"phase":                  "done",
		"connected":              connected,
		"published":              st.ok,
		"publish_errors":         st.errors,
		"first_publish_error":    st.firstErr,
		"publish_seconds":        st.end.Sub(st.start).Seconds(),
		"publish_lag_ms":         percentiles(st.lagMs),
		"expected":               expected,
		"received":               r.unique,
		"duplicates":             r.dups,
		"loss_of_expected":       loss,
		"latency_ms":             percentiles(lat),
		"disconnected":           r.disconnect.Load(),
		"first_disconnect_error": r.endErr,
	}
}
