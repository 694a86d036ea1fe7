package main

// The receiving side: every streaming connection in one epoll loop.
//
// One goroutine owns all the connections, so the cost per delivery is one
// read(2) (level-triggered epoll: a socket is read once per readiness, and
// reported again if data is left) plus the parse. A goroutine per connection
// with bufio costs several times that in scheduling and extra reads, and at
// 100,000 deliveries per second the load generator must stay well below its
// core. TLS cannot be read from raw descriptors: with -tls the streams run
// as goroutines instead (tls.go), through the same parser, a tally each.

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	stConnecting = iota
	stHead
	stBody
	stDone // failed, ended, or closed
)

const (
	chSize = iota // reading a chunk-size line
	chData        // inside a chunk
	chCRLF        // after a chunk's data, up to its line end
)

type stream struct {
	fd      int
	state   int
	started time.Time
	head    []byte // the response head, until complete
	frozen  bool   // reads its head, then nothing (frozen.go)

	chunked   bool
	chState   int
	chLeft    int64
	chSizeBuf []byte

	line      []byte // a partial line carried to the next read
	firstData bool
	stamped   bool
	ts, seq   int64

	seen []uint64 // bitmap of seqs received

	// Scale-out modes (scaleout.go).
	idx        int    // position in the opening order: picks address and channel
	pendingID  string // the id field of the event being read
	hasPending bool
	lastID     string // the id of the last event dispatched (Last-Event-ID)
	got        int    // seqs received (each once)
	wanted     bool   // open when the storm disconnected it: reconnects
	retryMs    int64  // the last retry field (0: none)
	live       bool   // one of the -live streams (live.go)
}

// tally counts the deliveries of a set of streams: all of them in the epoll
// loop, one stream per tally in TLS mode. Only one goroutine writes a tally
// until the receiver has stopped.
type tally struct {
	scheduled int
	now       int64         // unix nanos of the current read
	latencies []uint32      // microseconds
	unique    int64         // deliveries counted (each seq once per stream)
	dups      int64         // seqs received again on the same stream
	lastRecv  int64         // unix nanos of the last delivery
	counter   *atomic.Int64 // the receiver's received: unique, for the drain

	trackIDs    bool    // note each event's id and count reset events (-mode storm)
	resets      int64   // events named reset
	completions []int64 // unix nanos at which a stream had every scheduled seq

	keepSent bool    // keep each delivery's send time (the live streams' tally)
	sentAt   []int64 // unix nanos each delivery's event was sent, beside latencies
}

// merge adds another tally's deliveries to this one.
func (t *tally) merge(o *tally) {
	t.latencies = append(t.latencies, o.latencies...)
	t.unique += o.unique
	t.dups += o.dups
	if o.lastRecv > t.lastRecv {
		t.lastRecv = o.lastRecv
	}
}

type receiver struct {
	cfg     config
	sa      syscall.SockaddrInet4
	host    string
	epfd    int
	streams []*stream
	byFd    map[int]*stream
	buf     []byte

	// Connect phase.
	nextDial     int
	opening      int
	openMs       []float64 // the normal connections'
	failed       int       // normal connections that failed to open
	firstErr     string
	frozenOpened int // frozen connections whose head arrived
	frozenFailed int

	// Deliveries: only the loop goroutine writes these until it has stopped
	// (in TLS mode each stream has a tally, merged into this one then).
	tally
	endErr string

	received   atomic.Int64 // unique deliveries, read by the drain
	disconnect atomic.Int64
	stop       atomic.Bool

	// TLS mode (tls.go).
	tlsConns []*tls.Conn
	tlsState string // the first stream's protocol version and cipher suite

	// Scale-out modes (scaleout.go).
	sas     []syscall.SockaddrInet4 // -addrs: stream i connects to sas[(i+shift) % len]
	shift   int                     // set before a reconnect (the storm moves clients)
	resume  bool                    // requests carry Last-Event-ID (the storm's reconnect)
	cmd     chan string             // the loop's commands: disconnect, reconnect
	ack     chan struct{}           // the loop has done a disconnect
	wantedN int                     // streams the disconnect closed
	redial  []redial                // storm: streams the server closed, to reopen
	retried int                     // storm: reopened after the server closed them

	// Live streams beside the accept (live.go): their own tally and counts.
	liveStreams    []*stream
	liveT          tally
	liveReceived   atomic.Int64
	liveReady      chan struct{} // every live stream has its head (or failed)
	liveOpening    int
	liveFailed     int
	liveErr        string
	liveDisconnect atomic.Int64

	// Hold mode (hold.go).
	src     *syscall.SockaddrInet4 // -src: the streams' source address (nil: the kernel's)
	startNs int64                  // unix nanos of the first dial
	snap    chan snapshot          // the loop's answer to "snapshot"
	mark    int                    // deliveries before it are in an earlier snapshot
}

func newReceiver(cfg config, scheduled int) (*receiver, error) {
	addr, err := net.ResolveTCPAddr("tcp4", cfg.addr)
	if err != nil {
		return nil, err
	}
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	r := &receiver{
		cfg: cfg, host: cfg.addr, epfd: epfd,
		streams: make([]*stream, cfg.conns+cfg.frozen),
		byFd:    make(map[int]*stream, cfg.conns+cfg.frozen),
		buf:     make([]byte, 64<<10),
	}
	r.scheduled = scheduled
	r.counter = &r.received
	r.trackIDs = cfg.mode == "storm"
	r.cmd = make(chan string, 1)
	r.ack = make(chan struct{}, 1)
	r.liveReady = make(chan struct{}, 1)
	r.snap = make(chan snapshot, 1)
	if cfg.src != "" {
		ip := net.ParseIP(cfg.src).To4()
		if ip == nil {
			return nil, fmt.Errorf("-src %q is not an IPv4 address", cfg.src)
		}
		r.src = &syscall.SockaddrInet4{}
		copy(r.src.Addr[:], ip)
	}
	if cfg.live > 0 {
		r.liveT = newLiveTally(cfg, &r.liveReceived)
	}
	r.sa.Port = addr.Port
	copy(r.sa.Addr[:], addr.IP.To4())
	if err := r.streamAddrs(cfg.addrs); err != nil {
		return nil, err
	}
	if scheduled > 0 && !cfg.tls && cfg.mode != "hold" { // TLS: the streams' tallies, merged
		r.latencies = make([]uint32, 0, scheduled*cfg.conns)
	}
	return r, nil
}

// run opens every connection, signals connected, then reads until stopped.
func (r *receiver) run(connected chan<- float64) {
	start := time.Now()
	r.startNs = start.UnixNano()
	events := make([]syscall.EpollEvent, 1024)
	phase := r.cfg.live == 0 // with live streams: those first, then "accept"
	livePending := r.cfg.live > 0
	if livePending {
		r.dialLive()
	}
	lastSweep := time.Now()
	for !r.stop.Load() {
		select {
		case c := <-r.cmd:
			switch c {
			case "disconnect":
				r.dropAll()
				r.ack <- struct{}{}
			case "reconnect":
				r.nextDial, r.failed, r.firstErr, r.openMs = 0, 0, "", r.openMs[:0]
				phase, start = true, time.Now()
			case "accept":
				phase, start = true, time.Now()
			case "snapshot":
				r.snap <- r.takeSnapshot()
			}
		default:
		}
		if phase {
			r.dialMore()
		}
		n, err := syscall.EpollWait(r.epfd, events, 10)
		if err != nil && err != syscall.EINTR {
			fail("epoll_wait: " + err.Error())
		}
		for i := 0; i < n; i++ {
			s := r.byFd[int(events[i].Fd)]
			if s != nil {
				r.handle(s, events[i].Events)
			}
		}
		if len(r.redial) > 0 {
			r.redialDue()
		}
		if livePending && r.liveOpening == 0 {
			livePending = false
			r.liveReady <- struct{}{}
		}
		if (phase || livePending) && time.Since(lastSweep) > 100*time.Millisecond {
			lastSweep = time.Now()
			r.sweepTimeouts()
		}
		if phase && r.nextDial == len(r.streams) && r.opening == 0 {
			phase = false
			connected <- time.Since(start).Seconds()
		}
	}
}

func (r *receiver) dialMore() {
	for r.opening < r.cfg.dialers && r.nextDial < len(r.streams) {
		i := r.nextDial
		r.nextDial++
		s := r.streams[i]
		if s == nil {
			s = &stream{started: time.Now(), firstData: true, frozen: r.isFrozen(i), idx: i}
			if r.scheduled > 0 && !s.frozen {
				s.seen = make([]uint64, (r.scheduled+63)/64)
			}
			r.streams[i] = s
		} else if !s.reopen() {
			continue
		}
		r.dial(s)
	}
}

// dial opens the connection of stream s (a new one, or one to reopen).
func (r *receiver) dial(s *stream) {
	if s.live {
		r.liveOpening++
	} else {
		r.opening++
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		r.failOpen(s, err)
		return
	}
	s.fd = fd
	r.byFd[fd] = s
	if r.src != nil {
		if err := bindSource(fd, r.src); err != nil {
			r.failOpen(s, err)
			return
		}
	}
	if s.frozen {
		if err := r.frozenOptions(fd); err != nil {
			r.failOpen(s, err)
			return
		}
	}
	err = syscall.Connect(fd, r.addrOf(s))
	if err != nil && err != syscall.EINPROGRESS {
		r.failOpen(s, err)
		return
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLOUT | syscall.EPOLLRDHUP, Fd: int32(fd)}
	if err := syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		r.failOpen(s, err)
	}
}

func (r *receiver) failOpen(s *stream, err error) {
	if s.live {
		r.liveOpening--
		r.liveFailed++
		if r.liveErr == "" {
			r.liveErr = err.Error()
		}
		r.finish(s)
		return
	}
	r.opening--
	if s.frozen {
		r.frozenFailed++
	} else {
		r.failed++
	}
	if r.firstErr == "" {
		r.firstErr = err.Error()
	}
	r.finish(s)
}

func (r *receiver) finish(s *stream) {
	if s.fd > 0 {
		syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_DEL, s.fd, nil)
		syscall.Close(s.fd)
		delete(r.byFd, s.fd)
	}
	s.fd = -1
	s.state = stDone
}

func (r *receiver) sweepTimeouts() {
	for _, s := range append(r.streams[:len(r.streams):len(r.streams)], r.liveStreams...) {
		if s != nil && (s.state == stConnecting || s.state == stHead) && s.fd != -1 &&
			time.Since(s.started) > r.cfg.headTimeout {
			r.failOpen(s, fmt.Errorf("no response head within %v", r.cfg.headTimeout))
		}
	}
}

func (r *receiver) handle(s *stream, ev uint32) {
	if s.state == stConnecting {
		if ev&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) == 0 {
			return
		}
		if soerr, err := syscall.GetsockoptInt(s.fd, syscall.SOL_SOCKET, syscall.SO_ERROR); err != nil || soerr != 0 {
			if err == nil {
				err = syscall.Errno(soerr)
			}
			r.failOpen(s, err)
			return
		}
		req := "GET " + r.cfg.eventsPath + r.query(s) + " HTTP/1.1\r\nHost: " + r.host +
			"\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
		if r.resume && s.lastID != "" {
			req += "Last-Event-ID: " + s.lastID + "\r\n"
		}
		req += "\r\n"
		if n, err := syscall.Write(s.fd, []byte(req)); err != nil || n != len(req) {
			r.failOpen(s, fmt.Errorf("writing the request: %v", err))
			return
		}
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(s.fd)}
		syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_MOD, s.fd, &ev)
		s.state = stHead
		return
	}
	n, err := syscall.Read(s.fd, r.buf)
	if err == syscall.EAGAIN || err == syscall.EINTR {
		return
	}
	if n <= 0 {
		if err == nil {
			err = fmt.Errorf("EOF")
		}
		if s.state == stHead {
			r.failOpen(s, fmt.Errorf("reading the head: %v", err))
			return
		}
		if s.live {
			if !r.stop.Load() {
				r.liveDisconnect.Add(1)
			}
			r.finish(s)
			return
		}
		if !r.stop.Load() {
			r.disconnect.Add(1)
			if r.endErr == "" {
				r.endErr = err.Error()
			}
		}
		r.finish(s)
		if r.resume && !r.stop.Load() {
			r.retryLater(s) // the storm: back with Last-Event-ID, as a browser
		}
		return
	}
	r.now = time.Now().UnixNano()
	r.liveT.now = r.now
	data := r.buf[:n]
	if s.state == stHead {
		s.head = append(s.head, data...)
		end := bytes.Index(s.head, []byte("\r\n\r\n"))
		if end < 0 {
			return
		}
		rest := s.head[end+4:]
		if err := s.checkHead(s.head[:end]); err != nil {
			r.failOpen(s, err)
			return
		}
		s.state = stBody
		s.head = nil
		if s.live {
			r.liveOpening--
			r.liveT.body(s, append([]byte(nil), rest...))
			return
		}
		r.opening--
		if s.frozen {
			r.freeze(s)
			return
		}
		r.openMs = append(r.openMs, float64(time.Since(s.started).Microseconds())/1000)
		data = append([]byte(nil), rest...)
	}
	if s.live {
		r.liveT.body(s, data)
		return
	}
	r.body(s, data)
}

// checkHead wants 200 and text/event-stream, and notes chunked framing.
func (s *stream) checkHead(head []byte) error {
	lines := bytes.Split(head, []byte("\r\n"))
	status := bytes.Fields(lines[0])
	if len(status) < 2 || !bytes.HasPrefix(status[0], []byte("HTTP/1.")) {
		return fmt.Errorf("bad status line %q", lines[0])
	}
	if code, _ := strconv.Atoi(string(status[1])); code != 200 {
		return fmt.Errorf("status %d", code)
	}
	contentType := ""
	for _, l := range lines[1:] {
		name, value, ok := bytes.Cut(l, []byte(":"))
		if !ok {
			continue
		}
		value = bytes.TrimSpace(value)
		switch string(bytes.ToLower(bytes.TrimSpace(name))) {
		case "content-type":
			contentType = string(value)
		case "transfer-encoding":
			s.chunked = bytes.EqualFold(value, []byte("chunked"))
		}
	}
	if !bytes.HasPrefix([]byte(contentType), []byte("text/event-stream")) {
		return fmt.Errorf("content-type %q", contentType)
	}
	return nil
}

// body removes the chunked framing, if any, and parses what is left.
func (t *tally) body(s *stream, p []byte) {
	if !s.chunked {
		t.parse(s, p)
		return
	}
	for len(p) > 0 {
		switch s.chState {
		case chSize:
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				s.chSizeBuf = append(s.chSizeBuf, p...)
				return
			}
			s.chSizeBuf = append(s.chSizeBuf, p[:i]...)
			p = p[i+1:]
			hex, _, _ := bytes.Cut(bytes.TrimSpace(s.chSizeBuf), []byte(";"))
			size, err := strconv.ParseInt(string(hex), 16, 64)
			s.chSizeBuf = s.chSizeBuf[:0]
			if err != nil || size == 0 {
				return // a malformed or the last chunk: nothing more to parse
			}
			s.chLeft, s.chState = size, chData
		case chData:
			take := int64(len(p))
			if take > s.chLeft {
				take = s.chLeft
			}
			t.parse(s, p[:take])
			p = p[take:]
			if s.chLeft -= take; s.chLeft == 0 {
				s.chState = chCRLF
			}
		case chCRLF:
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				return
			}
			p = p[i+1:]
			s.chState = chSize
		}
	}
}

// parse splits the event stream into lines (LF or CRLF; none of the servers
// under test ends lines with a lone CR) and dispatches on a blank line.
func (t *tally) parse(s *stream, p []byte) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			s.line = append(s.line, p...)
			return
		}
		line := p[:i]
		if len(s.line) > 0 {
			s.line = append(s.line, line...)
			line = s.line
		}
		p = p[i+1:]
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		t.line(s, line)
		s.line = s.line[:0]
	}
}

func (t *tally) line(s *stream, line []byte) {
	if len(line) == 0 {
		if s.stamped {
			t.record(s)
		}
		if s.hasPending {
			s.lastID, s.hasPending = s.pendingID, false
		}
		s.stamped, s.firstData = false, true
		return
	}
	if s.firstData && bytes.HasPrefix(line, []byte("data:")) {
		s.firstData = false
		s.ts, s.seq, s.stamped = parseStamp(line[5:])
		return
	}
	if t.trackIDs {
		t.fields(s, line)
	}
}

func (t *tally) record(s *stream) {
	seq := s.seq
	if seq < 0 || seq >= int64(t.scheduled) {
		return
	}
	word, bit := seq/64, uint64(1)<<(seq%64)
	if s.seen[word]&bit != 0 {
		t.dups++
		return
	}
	s.seen[word] |= bit
	t.unique++
	if s.got++; s.got == t.scheduled {
		t.completions = append(t.completions, t.now)
	}
	lat := (t.now - s.ts) / 1000
	if lat < 0 {
		lat = 0
	}
	if lat > 1<<32-1 {
		lat = 1<<32 - 1
	}
	t.latencies = append(t.latencies, uint32(lat))
	if t.keepSent {
		t.sentAt = append(t.sentAt, s.ts)
	}
	t.lastRecv = t.now
	t.counter.Add(1)
}

// parseStamp reads "<nanos> <seq>" from the start of a data value.
func parseStamp(v []byte) (ts, seq int64, ok bool) {
	if len(v) > 0 && v[0] == ' ' {
		v = v[1:]
	}
	ts, v, ok = parseInt(v)
	if !ok || len(v) == 0 || v[0] != ' ' {
		return 0, 0, false
	}
	seq, _, ok = parseInt(v[1:])
	return ts, seq, ok
}

func parseInt(v []byte) (int64, []byte, bool) {
	var n int64
	i := 0
	for ; i < len(v) && i < 19 && v[i] >= '0' && v[i] <= '9'; i++ {
		n = n*10 + int64(v[i]-'0')
	}
	return n, v[i:], i > 0
}

// connectedCount counts the streams whose head arrived and that are open.
func (r *receiver) connectedCount() int {
	n := 0
	for _, s := range r.streams {
		if s != nil && s.state == stBody {
			n++
		}
	}
	return n
}

func (r *receiver) closeAll() {
	if r.cfg.tls {
		r.closeTLS()
		return
	}
	for _, s := range append(r.streams, r.liveStreams...) {
		if s != nil && s.fd > 0 {
			syscall.Close(s.fd)
		}
	}
}
