package main

// Live clients beside an accept (-live N, with -mode perchannel).
//
// Before the -conns streams are opened, N "live" streams subscribe to channel
// -live-channel (live stream j on address j mod n of -addrs), and events are
// published to that channel at -live-rate through -addr, as in the default
// mode: the data of each is "<unix-nanos> <seq> …", stamped when its POST
// leaves. After -live-warm, the load generator measures a baseline window of
// -live-baseline with nothing else going on, prints the "live" phase line, and
// only then opens the -conns streams; the live publishing goes on until the
// last of them has its head. The live streams have a tally of their own: each
// delivery is kept with the time its event was sent, and the "done" line
// reports the live latency of the events sent in each window (baseline and
// accept): a late delivery counts in the window its event was sent in.

import (
	"sort"
	"sync/atomic"
	"time"
)

// liveMaxSeconds bounds the live publishing (and the seqs a live stream tracks).
const liveMaxSeconds = 600

type liveRun struct {
	cfg          config
	stop         chan struct{}
	done         chan publishStats
	baseStart    time.Time
	baseEnd      time.Time
	acceptStart  time.Time
	acceptEnd    time.Time
	liveOpened   int
	publishStats publishStats
}

// liveScheduled is the number of seqs a live stream tracks.
func liveScheduled(cfg config) int {
	return int(cfg.liveRate*liveMaxSeconds) + 1
}

// dialLive opens every live stream (the loop calls it once, first).
func (r *receiver) dialLive() {
	n := r.cfg.live
	r.liveStreams = make([]*stream, n)
	for j := 0; j < n; j++ {
		s := &stream{started: time.Now(), firstData: true, idx: j, live: true}
		s.seen = make([]uint64, (r.liveT.scheduled+63)/64)
		r.liveStreams[j] = s
		r.dial(s)
	}
}

// liveOpen counts the live streams that have their head and are open.
func (r *receiver) liveOpen() int {
	n := 0
	for _, s := range r.liveStreams {
		if s.state == stBody {
			n++
		}
	}
	return n
}

// startLive waits for the live streams, starts publishing to their channel,
// measures the baseline window, prints the "live" line and tells the loop to
// open the -conns streams. The caller calls endLive once they are open.
func startLive(cfg config, r *receiver) *liveRun {
	<-r.liveReady
	lr := &liveRun{cfg: cfg, stop: make(chan struct{}), done: make(chan publishStats, 1)}
	lr.liveOpened = cfg.live - r.liveFailed // the loop no longer changes it before the accept
	pcfg := cfg
	pcfg.publishers = 4 // a slow POST does not hold up the next ones
	url := publishURL(cfg, cfg.liveChannel)
	go func() {
		lr.done <- publish(pcfg, plan{
			n:        liveScheduled(cfg),
			interval: time.Duration(float64(time.Second) / cfg.liveRate),
			url:      func(int) string { return url },
			seq:      func(i int) int { return i },
			stop:     lr.stop,
		})
	}()
	time.Sleep(cfg.liveWarm)
	lr.baseStart = time.Now()
	time.Sleep(cfg.liveBaseline)
	lr.baseEnd = time.Now()
	emit(map[string]any{
		"phase":          "live",
		"live":           cfg.live,
		"live_connected": lr.liveOpened,
		"live_failed":    cfg.live - lr.liveOpened,
		"first_error":    r.liveErr,
	})
	lr.acceptStart = time.Now()
	r.cmd <- "accept"
	return lr
}

// endLive marks the end of the accept window and stops the live publishing.
func (lr *liveRun) endLive() {
	lr.acceptEnd = time.Now()
	close(lr.stop)
	lr.publishStats = <-lr.done
}

// result is the live streams' figures, read once the loop has stopped.
func (lr *liveRun) result(r *receiver) map[string]any {
	type window struct {
		from, to time.Time
		lat      []float64
		sent     int
	}
	windows := []*window{{from: lr.baseStart, to: lr.baseEnd}, {from: lr.acceptStart, to: lr.acceptEnd}}
	in := func(w *window, ns int64) bool {
		return ns >= w.from.UnixNano() && ns < w.to.UnixNano()
	}
	for i, us := range r.liveT.latencies {
		ns := r.liveT.sentAt[i]
		for _, w := range windows {
			if in(w, ns) {
				w.lat = append(w.lat, float64(us)/1000)
			}
		}
	}
	for _, ns := range lr.publishStats.okNs {
		for _, w := range windows {
			if in(w, ns) {
				w.sent++
			}
		}
	}
	fig := func(w *window) map[string]any {
		sort.Float64s(w.lat)
		expected := int64(w.sent) * int64(lr.liveOpened)
		return map[string]any{
			"seconds":    w.to.Sub(w.from).Seconds(),
			"published":  w.sent,
			"expected":   expected,
			"received":   len(w.lat),
			"lost":       expected - int64(len(w.lat)),
			"latency_ms": percentiles(w.lat),
		}
	}
	st := lr.publishStats
	return map[string]any{
		"streams":             lr.cfg.live,
		"connected":           lr.liveOpened,
		"channel":             lr.cfg.liveChannel,
		"rate":                lr.cfg.liveRate,
		"published":           st.ok,
		"publish_errors":      st.errors,
		"first_publish_error": st.firstErr,
		"received":            r.liveT.unique,
		"duplicates":          r.liveT.dups,
		"disconnected":        r.liveDisconnect.Load(),
		"baseline":            fig(windows[0]),
		"accept":              fig(windows[1]),
	}
}

// liveTally is the live streams' tally: it keeps each delivery's send time.
func newLiveTally(cfg config, counter *atomic.Int64) tally {
	return tally{scheduled: liveScheduled(cfg), counter: counter, keepSent: true}
}
