#!/bin/bash
for r in 1 2 3; do for t in lb:18091 proto2:18098 hap:18092; do IFS=: read n p <<<"$t";
 out=$(wrk -t2 -c64 -d5s --latency http://127.0.0.1:$p/ 2>&1); rps=$(awk '/Requests\/sec/{print $2}' <<<"$out"); p99=$(awk '$1=="99%"{print $2}' <<<"$out"); err=$(grep -c "Non-2xx\|Socket errors" <<<"$out")
 echo "$r $n $rps $p99 err=$err"; done; done
