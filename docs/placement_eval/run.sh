#!/bin/bash
# Compare preference placements with amulet-eval over HTTP: one server per placement, two request shapes.
cd /work/main
Q=/work/shared/eval/personal_preference_eval_preference_data.json
for placement in system end; do
  port=$((8200 + RANDOM % 500))
  .venv/bin/amulet-server --port $port --preference-placement $placement --no-playground --log-level warning > /tmp/peval/server-$placement.log 2>&1 &
  pid=$!
  for i in $(seq 1 240); do curl -sf http://127.0.0.1:$port/ready >/dev/null && break; sleep 1; done
  for shape in paper bare; do
    extra=""; [ $shape = bare ] && extra="--no-system-prompt"
    .venv/bin/amulet-eval --base-url http://127.0.0.1:$port/v1 --questions $Q --limit 10 \
      --preferences concise verbose uplifting formal --methods base pref amulet --fluency-model embedded \
      --no-charts --no-progress --concurrency 8 $extra --out /tmp/peval/$placement-$shape > /tmp/peval/eval-$placement-$shape.log 2>&1
    echo "$placement $shape exit $?" >> /tmp/peval/status
  done
  kill $pid; wait $pid
done
echo DONE >> /tmp/peval/status
