// Command loadgen is the load generator of sse_handler's benchmarks.
//
// It opens -conns streaming connections (GET /events), at most -dialers at a
// time, checks that each answers 200 with a text/event-stream head, and parses
// the events that arrive (close-delimited or chunked bodies), all in one epoll
// loop (stream.go). Then it publishes -rate events per second for -duration
// over HTTP (POST /publish, body = event data). With -tls everything goes over
// TLS instead (HTTPS, certificate not verified): the streams, one goroutine
// each (tls.go), and the publishing. The data of every published event is
//
//	<unix-nanos> <seq> <padding to -size bytes>
//
// so a subscriber computes publish->receive latency from the event alone and
// counts each (connection, seq) once. Events whose data does not start with a
// timestamp (a welcome event, keep-alive comments) are ignored.
//
// With -frozen N it also opens N frozen connections, spread among the others
// in the order of opening: each has a small receive buffer (SO_RCVBUF set
// before connect, -frozen-rcvbuf) and an Ethernet-sized MSS (-frozen-mss, see
// frozen.go), sends its request, reads the response head and then never reads
// again, like a frozen browser tab. They count in no
// figure of deliveries or latency. A server closes a frozen connection with
// its unsent data still queued, so its FIN waits behind that data and the
// client cannot tell without reading: "done" reports the closes visible
// without reading (FIN or RST already received), and the last phase,
// "frozen", reads each frozen connection to its end (EOF or ECONNRESET: the
// server closed it; no end within -probe-idle of silence: still open).
//
// -mode hold keeps the streams open and takes commands on stdin instead
// (publish windows, a broadcast the caller sends; see hold.go), and -src binds
// the streams to a source address, so that several load generators can share
// one server's streams.
//
// It prints one JSON object per phase on stdout: "connected" once every
// connection has its head (or failed), "done" after publishing and draining,
// and with -frozen "frozen" once the frozen connections have been read out.
// With -wait it reads a line from stdin before publishing and another before
// reading out the frozen connections and closing, so that the caller can
// sample the server (RSS, CPU) at those points. Standard library only: the
// bench builds it with `go build` and no network.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"runtime"
	"sort"
	"sync"
	"time"
)

type config struct {
	addr        string
	eventsPath  string
	publishPath string
	conns       int
	rate        float64
	duration    time.Duration
	size        int
	dialers     int
	publishers  int
	drain       time.Duration
	headTimeout time.Duration
	wait        bool
	frozen      int
	frozenBuf   int
	frozenMSS   int
	probeIdle   time.Duration
	probeLimit  time.Duration
	tls         bool

	// Scale-out modes (scaleout.go).
	addrs       string
	channels    int
	mode        string
	pre         int
	missed      int
	stormShift  int
	stormPause  time.Duration
	replayLimit time.Duration

	// Live streams beside the accept (live.go).
	live         int
	liveRate     float64
	liveChannel  string
	liveWarm     time.Duration
	liveBaseline time.Duration

	// Hold mode (hold.go).
	src  string
	seqs int
}

func parseFlags() config {
	var c config
	flag.StringVar(&c.addr, "addr", "127.0.0.1:8888", "server host:port")
	flag.StringVar(&c.eventsPath, "events", "/events", "path of the stream")
	flag.StringVar(&c.publishPath, "publish", "/publish", "path that broadcasts a POST body")
	flag.IntVar(&c.conns, "conns", 100, "streaming connections to open")
	flag.Float64Var(&c.rate, "rate", 10, "events published per second (0: idle, publish nothing)")
	flag.DurationVar(&c.duration, "duration", 10*time.Second, "how long to publish")
	flag.IntVar(&c.size, "size", 100, "bytes of data per event (at least the timestamp and seq)")
	flag.IntVar(&c.dialers, "dialers", 100, "connections being opened at once (dial to response head)")
	flag.IntVar(&c.publishers, "publishers", 4, "concurrent publishing HTTP connections")
	flag.DurationVar(&c.drain, "drain", 5*time.Second, "how long to wait for deliveries after the last publish")
	flag.DurationVar(&c.headTimeout, "head-timeout", 15*time.Second, "per connection: dial to response head")
	flag.BoolVar(&c.wait, "wait", false, "read a line from stdin before publishing and before closing")
	flag.IntVar(&c.frozen, "frozen", 0, "extra connections that read the response head and then nothing")
	flag.IntVar(&c.frozenBuf, "frozen-rcvbuf", 4096, "SO_RCVBUF of a frozen connection, in bytes (the kernel doubles it)")
	flag.IntVar(&c.frozenMSS, "frozen-mss", 1460, "TCP_MAXSEG of a frozen connection, as on Ethernet (0: loopback's, ~64 KiB)")
	flag.DurationVar(&c.probeIdle, "probe-idle", 500*time.Millisecond, "reading out a frozen connection: silence that means it is still open")
	flag.DurationVar(&c.probeLimit, "probe-limit", 10*time.Second, "reading out the frozen connections: at most this long")
	flag.BoolVar(&c.tls, "tls", false, "streams and publishing over TLS (HTTPS), without verifying the server's certificate")
	flag.StringVar(&c.addrs, "addrs", "", "streams over these servers, host:port,host:port (stream i: address i mod n; default -addr); events are published to -addr")
	flag.IntVar(&c.channels, "channels", 0, "stream i subscribes ?channel=c<i mod N> (0: no channel in the query); the broadcast modes publish to c0")
	flag.StringVar(&c.mode, "mode", "", "\"\" (publish -rate for -duration), perchannel (one event to each channel), storm (see scaleout.go) or hold (commands on stdin, see hold.go)")
	flag.IntVar(&c.pre, "pre", 5, "storm: events published before the disconnect")
	flag.IntVar(&c.missed, "missed", 20, "storm: events published while the clients are away")
	flag.IntVar(&c.stormShift, "storm-shift", 0, "storm: a stream reconnects to address (i + shift) mod n")
	flag.DurationVar(&c.stormPause, "storm-pause", 500*time.Millisecond, "storm: pause after the disconnect and before the reconnect")
	flag.DurationVar(&c.replayLimit, "replay-limit", 60*time.Second, "storm: wait at most this long for every replay")
	flag.IntVar(&c.live, "live", 0, "perchannel: live streams opened first, on -live-channel, receiving -live-rate events/s through the accept (live.go)")
	flag.Float64Var(&c.liveRate, "live-rate", 20, "live: events per second to -live-channel")
	flag.StringVar(&c.liveChannel, "live-channel", "live", "live: the live streams' channel")
	flag.DurationVar(&c.liveWarm, "live-warm", time.Second, "live: publishing before the baseline window")
	flag.DurationVar(&c.liveBaseline, "live-baseline", 3*time.Second, "live: the baseline window, before the accept")
	flag.StringVar(&c.src, "src", "", "the streams' source address, e.g. 127.0.0.2 (default: the kernel's choice)")
	flag.IntVar(&c.seqs, "seqs", 4096, "hold: seqs a stream tracks (the publish windows' and the caller's broadcasts)")
	flag.Parse()
	return c
}

func main() {
	cfg := parseFlags()
	if cfg.conns < 1 {
		fail("-conns must be at least 1")
	}
	if cfg.frozen < 0 {
		fail("-frozen must not be negative")
	}
	if cfg.tls && cfg.frozen > 0 {
		fail("-frozen is not supported with -tls")
	}
	if cfg.tls && (cfg.mode != "" || cfg.addrs != "" || cfg.channels > 0) {
		fail("-mode, -addrs and -channels are not supported with -tls")
	}
	if cfg.live > 0 && (cfg.mode != "perchannel" || cfg.liveRate <= 0) {
		fail("-live needs -mode perchannel and -live-rate > 0")
	}
	scheduled := 0
	switch cfg.mode {
	case "":
		if cfg.rate > 0 {
			scheduled = int(math.Round(cfg.rate * cfg.duration.Seconds()))
		}
	case "perchannel":
		scheduled = 1
	case "hold":
		if cfg.seqs < 1 || cfg.wait || cfg.frozen > 0 {
			fail("-mode hold needs -seqs >= 1, and takes neither -wait nor -frozen")
		}
		scheduled = cfg.seqs
	case "storm":
		if cfg.rate <= 0 || cfg.pre < 1 || cfg.missed < 0 {
			fail("-mode storm needs -rate > 0, -pre >= 1 and -missed >= 0")
		}
		scheduled = cfg.pre + cfg.missed
	default:
		fail("unknown -mode " + cfg.mode)
	}
	r, err := newReceiver(cfg, scheduled)
	if err != nil {
		fail(err.Error())
	}
	connected := make(chan float64, 1)
	stopped := make(chan struct{})
	go func() {
		if cfg.tls {
			r.runTLS(connected)
		} else {
			runtime.LockOSThread()
			r.run(connected)
		}
		close(stopped)
	}()
	var lr *liveRun
	if cfg.live > 0 {
		lr = startLive(cfg, r)
	}
	acceptSeconds := <-connected
	if lr != nil {
		lr.endLive()
	}
	sort.Float64s(r.openMs) // the loop no longer touches it once connected
	emit(map[string]any{
		"phase":          "connected",
		"conns":          cfg.conns,
		"connected":      cfg.conns - r.failed,
		"failed":         r.failed,
		"first_error":    r.firstErr,
		"accept_seconds": acceptSeconds,
		"open_ms":        percentiles(r.openMs),
		"frozen":         cfg.frozen,
		"frozen_opened":  r.frozenOpened,
		"frozen_failed":  r.frozenFailed,
		"tls":            r.tlsState, // "" without -tls, or if no stream opened
		"start_ns":       r.startNs,
	})
	stdin := bufio.NewReader(os.Stdin)
	if cfg.mode == "hold" {
		hold(cfg, r, cfg.conns-r.failed, stdin)
		r.stop.Store(true)
		<-stopped
		r.closeAll()
		return
	}
	if cfg.wait {
		waitLine(stdin)
	}
	switch cfg.mode {
	case "perchannel":
		result := perChannel(cfg, r, cfg.conns-r.failed, stopped)
		if lr != nil {
			result["live"] = lr.result(r)
		}
		emit(result)
	case "storm":
		emit(storm(cfg, r, cfg.conns-r.failed, connected, stopped))
	default:
		emit(publishAndDrain(cfg, scheduled, r, cfg.conns-r.failed, stopped))
	}
	if cfg.wait {
		waitLine(stdin)
	}
	if cfg.frozen > 0 {
		emit(r.probeFrozen(cfg.probeIdle, cfg.probeLimit))
	}
	r.closeAll()
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "loadgen:", msg)
	os.Exit(2)
}

func waitLine(r *bufio.Reader) {
	if _, err := r.ReadString('\n'); err != nil && err != io.EOF {
		fail("reading stdin: " + err.Error())
	}
}

func emit(v any) {
	out, err := json.Marshal(v)
	if err != nil {
		fail(err.Error())
	}
	os.Stdout.Write(append(out, '\n'))
}

type publishStats struct {
	ok, errors int
	okAt       []bool // by index in the plan
	firstErr   string
	lagMs      []float64 // how late each publish left, against its schedule
	okNs       []int64   // unix nanos at which each accepted publish left
	start, end time.Time
}

// plan says what publish sends: n events, event i to url(i) with seq(i) in
// its data, at one per interval (0: as fast as the publishers go), none
// later than cutoff after the start (0: no cutoff).
type plan struct {
	n        int
	interval time.Duration
	cutoff   time.Duration
	url      func(i int) string
	seq      func(i int) int
	stop     <-chan struct{} // closed: schedule nothing more (nil: never)
}

// broadcast is the plan of the default mode: -rate events per second for
// -duration to one URL, none sent after twice the duration.
func broadcast(cfg config, scheduled int) plan {
	url := publishURL(cfg, defaultChannel(cfg))
	return plan{
		n:        scheduled,
		interval: time.Duration(float64(time.Second) / cfg.rate),
		cutoff:   2 * cfg.duration,
		url:      func(int) string { return url },
		seq:      func(i int) int { return i },
	}
}

// publish sends the plan's events from cfg.publishers keep-alive connections.
// A publisher that falls behind sends late events at once; nothing is sent
// after the cutoff (those count as unsent).
func publish(cfg config, p plan) publishStats {
	scheduled := p.n
	transport := &http.Transport{
		MaxIdleConnsPerHost: cfg.publishers,
		MaxConnsPerHost:     cfg.publishers,
		DisableCompression:  true,
	}
	if cfg.tls {
		// HTTP/1.1 (no ForceAttemptHTTP2), as the streams.
		transport.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
	}
	client := &http.Client{Transport: transport, Timeout: 30 * time.Second}
	pad := bytes.Repeat([]byte("x"), cfg.size)
	interval := p.interval
	start := time.Now()
	cutoff := start.Add(p.cutoff)
	slots := make(chan int, scheduled)
	go func() {
		defer close(slots)
		for i := 0; i < scheduled; i++ {
			if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
				select {
				case <-time.After(d):
				case <-p.stop:
					return
				}
			}
			select {
			case <-p.stop:
				return
			default:
			}
			slots <- i
		}
	}()
	var mu sync.Mutex
	st := publishStats{start: start, okAt: make([]bool, scheduled)}
	var wg sync.WaitGroup
	for w := 0; w < cfg.publishers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := range slots {
				i := seq
				now := time.Now()
				if p.cutoff > 0 && now.After(cutoff) {
					continue
				}
				lag := now.Sub(start.Add(time.Duration(i) * interval))
				head := fmt.Sprintf("%d %d ", now.UnixNano(), p.seq(i))
				body := []byte(head)
				if len(head) < cfg.size {
					body = append(body, pad[:cfg.size-len(head)]...)
				}
				err := post(client, p.url(i), body)
				mu.Lock()
				st.lagMs = append(st.lagMs, float64(lag.Microseconds())/1000)
				if err != nil {
					st.errors++
					if st.firstErr == "" {
						st.firstErr = err.Error()
					}
				} else {
					st.ok++
					st.okAt[i] = true
					st.okNs = append(st.okNs, now.UnixNano())
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	st.end = time.Now()
	transport.CloseIdleConnections()
	return st
}

func post(client *http.Client, url string, body []byte) error {
	resp, err := client.Post(url, "text/plain; charset=utf-8", bytes.NewReader(body))
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("publish: status %d", resp.StatusCode)
	}
	return nil
}

func publishAndDrain(cfg config, scheduled int, r *receiver, connected int, stopped <-chan struct{}) map[string]any {
	result := map[string]any{"phase": "done", "scheduled": scheduled, "connected": connected}
	if scheduled == 0 || connected == 0 {
		r.stop.Store(true)
		<-stopped
		result["disconnected"] = r.disconnect.Load()
		r.peekFrozen(result)
		return result
	}
	st := publish(cfg, broadcast(cfg, scheduled))
	expected := int64(st.ok) * int64(connected)
	// Drain: until every delivery of an accepted publish has arrived, or
	// cfg.drain has passed since the last publish.
	deadline := st.end.Add(cfg.drain)
	for r.received.Load() < expected && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	r.stop.Store(true)
	<-stopped // from here on the receiver's fields are ours to read
	lat := make([]float64, len(r.latencies))
	for i, us := range r.latencies {
		lat[i] = float64(us) / 1000
	}
	sort.Float64s(lat)
	sort.Float64s(st.lagMs)
	// Deliveries per second over the scheduled publishing time, or longer when
	// the last deliveries arrived after it.
	window := cfg.duration.Seconds()
	if r.lastRecv > 0 {
		if w := float64(r.lastRecv-st.start.UnixNano()) / 1e9; w > window {
			window = w
		}
	}
	loss := 0.0
	if expected > 0 {
		loss = 1 - float64(r.unique)/float64(expected)
	}
	result["published"] = st.ok
	result["publish_errors"] = st.errors
	result["first_publish_error"] = st.firstErr
	result["publish_seconds"] = st.end.Sub(st.start).Seconds()
	result["publish_lag_ms"] = percentiles(st.lagMs)
	result["offered"] = int64(scheduled) * int64(connected)
	result["offered_per_s"] = cfg.rate * float64(connected)
	result["expected"] = expected
	result["received"] = r.unique
	result["duplicates"] = r.dups
	result["loss_of_expected"] = loss
	result["deliveries_per_s"] = float64(r.unique) / window
	result["latency_ms"] = percentiles(lat)
	result["disconnected"] = r.disconnect.Load()
	result["first_disconnect_error"] = r.endErr
	r.peekFrozen(result)
	return result
}

func percentiles(sorted []float64) map[string]any {
	if len(sorted) == 0 {
		return map[string]any{"n": 0}
	}
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(sorted)))) - 1
		if i < 0 {
			i = 0
		}
		return sorted[i]
	}
	return map[string]any{
		"n":   len(sorted),
		"p50": at(0.50),
		"p90": at(0.90),
		"p99": at(0.99),
		"max": sorted[len(sorted)-1],
	}
}
