# Watch the detached queue until it is done or $1 seconds pass; send back what finished so far.
s0=$(date +%s)
while [ ! -f /tmp/q/done ] && [ $(( $(date +%s)-s0 )) -lt $1 ]; do sleep 5; done
cat /tmp/q/queue.log
for f in /tmp/q/std.log /tmp/q/c.log /tmp/q/naive.log /tmp/q/ray.log /tmp/q/local.log /tmp/q/profile.log; do
  [ -f $f ] && { echo "== $f"; grep -E "^\[[0-9]+/|rror|Traceback" $f | tail -14; }
done
[ -f /tmp/q/naive.log ] && tail -15 /tmp/q/naive.log; [ -f /tmp/q/profile.log ] && grep "^|" /tmp/q/profile.log
cd /tmp && tar czf $OUT/q.tgz --exclude=reference --exclude='*.safetensors' q qbstd qbc qbnaive qb1 qb2 2>/dev/null
ls -la $OUT; echo "MON WALL $(( $(date +%s)-s0 )) s"
