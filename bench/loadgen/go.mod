module sse_handler/bench/loadgen

go 1.19
