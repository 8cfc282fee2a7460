"""The Lua scripts of :class:`~easel.store.redis.RedisStore`: every state change is one script.

The fair-queue helpers (``push``, ``detach``, ``age``, ``next_entry``, ``serve``, ``place``)
transcribe :class:`easel.queue.scheduler.FairQueue` line by line, with its state in Redis, so that
both give the same serving order (``tests/test_store_redis.py`` checks it on random
operations). Floats cross into and out of Redis as ``%.17g`` text, which round-trips
exactly, and are added in the same order as in Python, so the tags are bit-identical.

Every script gets the same header in ARGV (see ``RedisStore._header``):
1 key prefix, 2 aging seconds ('' = off), 3 aged_every, 4 top priority, 5 now ('' = the
Redis server clock), 6 max attempts, 7 retention seconds; its own arguments follow.
"""

from __future__ import annotations

from easel import constants as k

_PRELUDE = f"""
local P = ARGV[1]
local AGING = tonumber(ARGV[2])
local AGED_EVERY = tonumber(ARGV[3])
local TOP = tonumber(ARGV[4])
local NOW = tonumber(ARGV[5])
if not NOW then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local MAX_ATTEMPTS = tonumber(ARGV[6])
local RETENTION = tonumber(ARGV[7])
local SEQ_OFFSET = {k.SEQ_OFFSET}
local SEQ_WIDTH = {k.SEQ_WIDTH}
local GRACE_MS = {k.RECORD_GRACE_SECONDS * 1000}

local K_ALL = P .. '{k.ALL}'
local K_FINISHED = P .. '{k.FINISHED}'
local K_ACTIVE = P .. '{k.ACTIVE}'
local K_COUNTS = P .. '{k.COUNTS}'
local K_LEASES = P .. '{k.LEASES}'
local K_DELAYED = P .. '{k.DELAYED}'
local K_TIERS = P .. '{k.TIERS}'
local K_WAITING = P .. '{k.WAITING}'
local K_SCHED = P .. '{k.SCHED}'
local K_QUEUED_USERS = P .. '{k.QUEUED_USERS}'
local K_ROUTE_COST = P .. '{k.ROUTE_COST}'
local function job_key(id) return P .. '{k.JOB}' .. id end
local function user_key(user) return P .. '{k.USER}' .. user end
local function service_key(service) return P .. '{k.SERVICE}' .. service end
local function state_key(state) return P .. '{k.STATE}' .. state end
local function tier_key(tier) return P .. '{k.TIER}' .. tier end
local function route_key(tier, route) return P .. '{k.ROUTE}' .. tier .. ':' .. route end
local function tier_state_key(tier) return P .. '{k.TIER_STATE}' .. tier end
local function finish_key(tier) return P .. '{k.FINISH}' .. tier end
"""

_HELPERS = """
local function fmt(x) return string.format('%.17g', x) end

-- a job's account (service/user, scheduler.account): caps and fair share count per account;
-- a job stored before accounts existed has only its user id
local function account_of(acct, user)
  if acct and acct ~= '' then return acct end
  return user
end

local function id_of(member) return string.sub(member, SEQ_WIDTH + 1) end

local function seq_of(member) return tonumber(string.sub(member, 1, SEQ_WIDTH)) end

local function next_seq() return redis.call('HINCRBY', K_SCHED, 'seq', 1) - 1 end

local function incr(key, field, by)
  local left = redis.call('HINCRBY', key, field, by)
  if left <= 0 then redis.call('HDEL', key, field) end
end

-- one attempt's record appended to the job's runs (JSON lines)
local function add_run(jk, run)
  if run and run ~= '' then
    local runs = redis.call('HGET', jk, 'runs') or ''
    redis.call('HSET', jk, 'runs', runs .. run .. '\\n')
  end
end

-- queued work per route; a route with (about) nothing left is dropped
local function route_cost(route, delta)
  local left = tonumber(redis.call('HINCRBYFLOAT', K_ROUTE_COST, route, fmt(delta)))
  if left <= 1e-9 then redis.call('HDEL', K_ROUTE_COST, route) end
end

-- FairQueue._add: a start tag from the tier clock (and the user's finish tag), or first
-- in line of its tier when put back (``front``)
local function push(id, front, weight)
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'user_id', 'tier', 'backend', 'cost', 'created_at', 'account')
  local user, tier, route, cost = account_of(f[6], f[1]), f[2], f[3], tonumber(f[4])
  local sk = tier_state_key(tier)
  local clock = tonumber(redis.call('HGET', sk, 'clock'))
  local tcost = 0
  if clock == nil then
    clock = 0
    redis.call('ZADD', K_TIERS, tier, tier)
  else
    tcost = tonumber(redis.call('HGET', sk, 'cost'))
  end
  local start, seq
  if front then
    local head = redis.call('ZRANGE', tier_key(tier), 0, 0, 'WITHSCORES')
    local first = clock
    if head[1] then first = tonumber(head[2]) end
    start = math.min(first, clock)
    seq = -next_seq()
  else
    local fk = finish_key(tier)
    start = math.max(clock, tonumber(redis.call('HGET', fk, user) or '0'))
    redis.call('HSET', fk, user, fmt(start + cost / weight))
    seq = next_seq()
  end
  local m = string.format('%0' .. SEQ_WIDTH .. 'd', seq + SEQ_OFFSET) .. id
  local s = fmt(start)
  redis.call('ZADD', tier_key(tier), s, m)
  redis.call('ZADD', route_key(tier, route), s, m)
  redis.call('HSET', sk, 'clock', fmt(clock), 'cost', fmt(tcost + cost))
  redis.call('HSET', jk, 'member', m)
  redis.call('HINCRBY', K_QUEUED_USERS, user, 1)
  route_cost(route, cost)
  if AGING and tonumber(tier) < TOP then
    redis.call('ZADD', K_WAITING, f[5], m)
  end
end

-- FairQueue._detach: an empty tier is forgotten (clock and finish tags with it)
local function detach(id, m)
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'tier', 'backend', 'user_id', 'cost', 'account')
  local tier = f[1]
  redis.call('ZREM', tier_key(tier), m)
  redis.call('ZREM', route_key(tier, f[2]), m)
  local sk = tier_state_key(tier)
  if redis.call('ZCARD', tier_key(tier)) == 0 then
    redis.call('DEL', sk, finish_key(tier))
    redis.call('ZREM', K_TIERS, tier)
  else
    redis.call('HSET', sk, 'cost', fmt(tonumber(redis.call('HGET', sk, 'cost')) - tonumber(f[4])))
  end
  redis.call('ZREM', K_WAITING, m)
  incr(K_QUEUED_USERS, account_of(f[5], f[3]), -1)
  route_cost(f[2], -tonumber(f[4]))
  redis.call('HSET', jk, 'member', '')
end

-- a queued job leaves the queue (or the delayed set)
local function dequeue(id)
  local m = redis.call('HGET', job_key(id), 'member')
  if m and m ~= '' then detach(id, m) else redis.call('ZREM', K_DELAYED, id) end
  incr(K_COUNTS, 'queued', -1)
end

-- retries whose backoff is over go back first in line, in the order they became due
local function release_due()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', fmt(NOW))) do
    redis.call('ZREM', K_DELAYED, id)
    push(id, true, 1)
  end
end

-- FairQueue.age: the tier of the oldest job waiting past the bound, if any
local function age()
  local starving = nil
  if AGING then
    local w = redis.call('ZRANGE', K_WAITING, 0, 0, 'WITHSCORES')
    if w[1] and tonumber(w[2]) <= NOW - AGING then
      starving = redis.call('HGET', job_key(id_of(w[1])), 'tier')
    end
  end
  if starving then
    redis.call('HSET', K_SCHED, 'starving', starving)
  else
    redis.call('HDEL', K_SCHED, 'starving')
  end
  return starving
end

-- _first: the first job of a tier that one of ``routes`` serves
local function first_in(tier, routes)
  local best_m, best_s, best_q = nil, nil, nil
  for _, route in ipairs(routes) do
    local r = redis.call('ZRANGE', route_key(tier, route), 0, 0, 'WITHSCORES')
    if r[1] then
      local s, q = tonumber(r[2]), seq_of(r[1])
      if best_m == nil or s < best_s or (s == best_s and q < best_q) then
        best_m, best_s, best_q = r[1], s, q
      end
    end
  end
  return best_m, best_s
end

-- FairQueue._next: highest tier first, but a starving tier gets one decision in aged_every
local function next_entry(routes, starving, since)
  if starving and redis.call('ZSCORE', K_TIERS, starving) and since >= AGED_EVERY - 1 then
    local m, s = first_in(starving, routes)
    if m then return m, s, starving end
  end
  for _, tier in ipairs(redis.call('ZREVRANGE', K_TIERS, 0, -1)) do
    local m, s = first_in(tier, routes)
    if m then return m, s, tier end
  end
  return nil
end

-- FairQueue._serve: advance the tier clock, forget stale finish tags, detach; returns since
local function serve(m, start, tier, starving, since)
  if tier == starving then
    since = 0
  else
    since = math.min(since + 1, AGED_EVERY - 1)
  end
  local sk = tier_state_key(tier)
  local clock = math.max(tonumber(redis.call('HGET', sk, 'clock')), start)
  redis.call('HSET', sk, 'clock', fmt(clock))
  local fk = finish_key(tier)
  if redis.call('HLEN', fk) > 2 * redis.call('ZCARD', tier_key(tier)) + 64 then
    local tags = redis.call('HGETALL', fk)
    for i = 1, #tags, 2 do
      if tonumber(tags[i + 1]) <= clock then redis.call('HDEL', fk, tags[i]) end
    end
  end
  detach(id_of(m), m)
  return since
end

-- a job reaches a final state: indexes, counts, lease, retention
local function finalise(id, old, new)
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'user_id', 'seq', 'account')
  redis.call('ZREM', K_LEASES, id)
  incr(K_ACTIVE, account_of(f[3], f[1]), -1)
  redis.call('ZREM', state_key(old), id)
  redis.call('ZADD', state_key(new), f[2], id)
  redis.call('ZADD', K_FINISHED, fmt(NOW), id)
  redis.call('PEXPIRE', jk, math.floor(RETENTION * 1000) + GRACE_MS)
end

local function move(id, old, new)
  local seq = redis.call('HGET', job_key(id), 'seq')
  redis.call('ZREM', state_key(old), id)
  redis.call('ZADD', state_key(new), seq, id)
end

-- running -> queued (first in line, or after ``delay``), or failed when attempts are spent
local function put_back(id, spend, reason, delay)
  local jk = job_key(id)
  local attempts = tonumber(redis.call('HGET', jk, 'attempts'))
  if not spend then attempts = math.max(attempts - 1, 0) end
  redis.call('ZREM', K_LEASES, id)
  if spend and attempts >= MAX_ATTEMPTS then
    redis.call('HSET', jk, 'state', 'failed', 'error', reason, 'finished_at', fmt(NOW),
      'attempts', attempts, 'worker_id', '', 'lease', '')
    finalise(id, 'running', 'failed')
    return
  end
  redis.call('HSET', jk, 'state', 'queued', 'started_at', '', 'attempts', attempts,
    'worker_id', '', 'lease', '')
  move(id, 'running', 'queued')
  redis.call('HINCRBY', K_COUNTS, 'queued', 1)
  if delay > 0 then
    redis.call('ZADD', K_DELAYED, fmt(NOW + delay), id)
  else
    push(id, true, 1)
  end
end

local FINAL = {succeeded = true, failed = true, cancelled = true}
"""


def _script(body: str) -> str:
    return _PRELUDE + _HELPERS + body


ENQUEUE = _script("""
-- 8 id, 9 user, 10 tier, 11 backend, 12 cost, 13 created_at, 14 batch key, 15 the job's
-- JSON without the fields scripts change (see redis.py),
-- 16 user cap, 17 queue cap ('' = none), 18 idempotency key ('' = none), 19 its ttl ms,
-- 20 the account's weight, 21 the service that owns it ('' = none), 22 the account
-- (service/user): what the caps and fair share count
local id, user, service, acct = ARGV[8], ARGV[9], ARGV[21], ARGV[22]
local idem = ARGV[18]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', job_key(existing)) == 1 then
    return {'dup', redis.call('HGETALL', job_key(existing))}
  end
end
local queued = tonumber(redis.call('HGET', K_COUNTS, 'queued') or '0')
local cap = tonumber(ARGV[17])
if cap and queued >= cap then return {'queue_full', queued} end
local active = tonumber(redis.call('HGET', K_ACTIVE, acct) or '0')
if active >= tonumber(ARGV[16]) then return {'user_full', active} end
local seq = redis.call('HINCRBY', K_SCHED, 'jobs', 1)
redis.call('HSET', job_key(id), 'id', id, 'user_id', user, 'tier', ARGV[10],
  'backend', ARGV[11], 'cost', ARGV[12], 'created_at', ARGV[13], 'batch_key', ARGV[14],
  'base', ARGV[15], 'state', 'queued', 'attempts', 0, 'started_at', '', 'finished_at', '',
  'worker_id', '', 'images', '[]', 'error', '', 'lease', '', 'member', '', 'seq', seq,
  'service', service, 'account', acct)
redis.call('ZADD', K_ALL, seq, id)
redis.call('ZADD', user_key(user), seq, id)
if service ~= '' then redis.call('ZADD', service_key(service), seq, id) end
redis.call('ZADD', state_key('queued'), seq, id)
push(id, false, tonumber(ARGV[20]))
redis.call('HINCRBY', K_ACTIVE, acct, 1)
redis.call('HINCRBY', K_COUNTS, 'queued', 1)
if idem ~= '' then redis.call('SET', idem, id, 'PX', ARGV[19]) end
return {'ok'}
""")

CLAIM = _script("""
-- 8 worker, 9 lease seconds, 10 limit, 11.. routes
release_due()
local since = tonumber(redis.call('HGET', K_SCHED, 'since') or '0')
local starving = age()
local routes = {}
for i = 11, #ARGV do routes[#routes + 1] = ARGV[i] end
local m, s, tier = next_entry(routes, starving, since)
if not m then return {} end
local first = id_of(m)
since = serve(m, s, tier, starving, since)
local batch = {first}
local key = redis.call('HGET', job_key(first), 'batch_key')
if key ~= '' then
  while #batch < tonumber(ARGV[10]) do
    local m2, s2, tier2 = next_entry(routes, starving, since)
    if not m2 or redis.call('HGET', job_key(id_of(m2)), 'batch_key') ~= key then break end
    since = serve(m2, s2, tier2, starving, since)
    batch[#batch + 1] = id_of(m2)
  end
end
redis.call('HSET', K_SCHED, 'since', since)
local lease = NOW + tonumber(ARGV[9])
local out = {}
for _, id in ipairs(batch) do
  local jk = job_key(id)
  redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('HSET', jk, 'state', 'running', 'worker_id', ARGV[8], 'started_at', fmt(NOW),
    'lease', fmt(lease))
  redis.call('ZADD', K_LEASES, fmt(lease), id)
  move(id, 'queued', 'running')
  incr(K_COUNTS, 'queued', -1)
  out[#out + 1] = redis.call('HGETALL', jk)
end
return out
""")

HEARTBEAT = _script("""
-- 8 id, 9 worker, 10 lease seconds
local jk = job_key(ARGV[8])
local f = redis.call('HMGET', jk, 'state', 'worker_id')
if f[1] ~= 'running' or f[2] ~= ARGV[9] then return 0 end
local lease = fmt(NOW + tonumber(ARGV[10]))
redis.call('HSET', jk, 'lease', lease)
redis.call('ZADD', K_LEASES, lease, ARGV[8])
return 1
""")

COMPLETE = _script("""
-- 8 id, 9 worker, 10 images JSON, 11 audio JSON, 12 the run's record ('' = none)
local id = ARGV[8]
local jk = job_key(id)
local f = redis.call('HMGET', jk, 'state', 'worker_id')
if not f[1] then return {'missing'} end
if f[1] ~= 'running' or f[2] ~= ARGV[9] then return {'lost', f[1]} end
add_run(jk, ARGV[12])
redis.call('HSET', jk, 'state', 'succeeded', 'images', ARGV[10], 'audio', ARGV[11],
  'finished_at', fmt(NOW), 'lease', '')
finalise(id, 'running', 'succeeded')
return {'ok', redis.call('HGETALL', jk)}
""")

FAIL = _script("""
-- 8 id, 9 error JSON, 10 worker ('' = whoever holds it), 11 the run's record ('' = none)
local id = ARGV[8]
local jk = job_key(id)
local f = redis.call('HMGET', jk, 'state', 'worker_id')
if not f[1] then return {'missing'} end
if ARGV[10] ~= '' then
  if f[1] ~= 'running' or f[2] ~= ARGV[10] then return {'lost', f[1]} end
elseif FINAL[f[1]] then
  return {'finished', f[1]}
end
if f[1] == 'queued' then dequeue(id) end
add_run(jk, ARGV[11])
redis.call('HSET', jk, 'state', 'failed', 'error', ARGV[9], 'finished_at', fmt(NOW),
  'lease', '')
finalise(id, f[1], 'failed')
return {'ok', redis.call('HGETALL', jk)}
""")

REQUEUE = _script("""
-- 8 id, 9 worker ('' = whoever holds it), 10 spend an attempt (1/0), 11 reason JSON,
-- 12 delay seconds, 13 the run's record ('' = none)
local id = ARGV[8]
local jk = job_key(id)
local f = redis.call('HMGET', jk, 'state', 'worker_id')
if not f[1] then return {'missing'} end
if ARGV[9] ~= '' then
  if f[1] ~= 'running' or f[2] ~= ARGV[9] then return {'lost', f[1]} end
elseif f[1] ~= 'running' then
  return {'finished', f[1]}
end
add_run(jk, ARGV[13])
put_back(id, ARGV[10] == '1', ARGV[11], tonumber(ARGV[12]))
return {'ok', redis.call('HGETALL', jk)}
""")

CANCEL = _script("""
-- 8 id
local id = ARGV[8]
local jk = job_key(id)
local state = redis.call('HGET', jk, 'state')
if not state then return {'missing'} end
if FINAL[state] then return {'finished', state} end
if state == 'queued' then dequeue(id) end
redis.call('HSET', jk, 'state', 'cancelled', 'finished_at', fmt(NOW), 'lease', '')
finalise(id, state, 'cancelled')
return {'ok', redis.call('HGETALL', jk)}
""")

EXPIRE = _script("""
-- 8 reason JSON, 9 limit. Leases that ran out go back; finished records past retention go.
local limit = tonumber(ARGV[9])
local out = {}
local lost = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', '(' .. fmt(NOW), 'LIMIT', 0, limit)
for _, id in ipairs(lost) do
  put_back(id, true, ARGV[8], 0)
  out[#out + 1] = redis.call('HGETALL', job_key(id))
end
local old = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', fmt(NOW - RETENTION), 'LIMIT', 0, limit)
for _, id in ipairs(old) do
  local f = redis.call('HMGET', job_key(id), 'user_id', 'state', 'service')
  if f[1] then
    redis.call('ZREM', user_key(f[1]), id)
    redis.call('ZREM', state_key(f[2]), id)
  end
  if f[3] and f[3] ~= '' then redis.call('ZREM', service_key(f[3]), id) end
  redis.call('ZREM', K_ALL, id)
  redis.call('ZREM', K_FINISHED, id)
  redis.call('DEL', job_key(id))
end
return out
""")

REORDER = _script("""
-- 8 id, 9 'front' or 'back'. FairQueue.move: first or last in line of the job's tier.
release_due()
local id = ARGV[8]
local jk = job_key(id)
local f = redis.call('HMGET', jk, 'state', 'member', 'tier', 'backend')
if not f[1] then return {'missing'} end
if f[1] ~= 'queued' then return {'not_queued', f[1]} end
local m, tier = f[2], f[3]
if not m or m == '' then return {'not_queued', 'held back for a retry'} end
local tk, rk = tier_key(tier), route_key(tier, f[4])
local old = tonumber(redis.call('ZSCORE', tk, m))
redis.call('ZREM', tk, m)
redis.call('ZREM', rk, m)
local waited = redis.call('ZSCORE', K_WAITING, m)
redis.call('ZREM', K_WAITING, m)
local start, seq
if ARGV[9] == 'front' then
  local clock = tonumber(redis.call('HGET', tier_state_key(tier), 'clock'))
  local head = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
  local first = clock
  if head[1] then first = tonumber(head[2]) end
  start = math.min(first, clock)
  seq = -next_seq()
else
  local tail = redis.call('ZRANGE', tk, -1, -1, 'WITHSCORES')
  start = old
  if tail[1] then start = math.max(tonumber(tail[2]), old) end
  seq = next_seq()
end
local m2 = string.format('%0' .. SEQ_WIDTH .. 'd', seq + SEQ_OFFSET) .. id
local s = fmt(start)
redis.call('ZADD', tk, s, m2)
redis.call('ZADD', rk, s, m2)
if waited then redis.call('ZADD', K_WAITING, waited, m2) end
redis.call('HSET', jk, 'member', m2)
return {'ok', redis.call('HGETALL', jk)}
""")

PLACE = _script("""
-- 8 id. FairQueue.place: O(tiers + log n), read from one consistent snapshot.
release_due()
local f = redis.call('HMGET', job_key(ARGV[8]), 'member', 'tier', 'cost')
local m, tier = f[1], f[2]
if not m or m == '' then return nil end
local tnum = tonumber(tier)
local prios = redis.call('ZREVRANGE', K_TIERS, 0, -1)
local count, tcost = {}, {}
for _, p in ipairs(prios) do
  count[p] = redis.call('ZCARD', tier_key(p))
  tcost[p] = tonumber(redis.call('HGET', tier_state_key(p), 'cost'))
end
local starving = redis.call('HGET', K_SCHED, 'starving') or nil
if starving and not count[starving] then starving = nil end
local since = tonumber(redis.call('HGET', K_SCHED, 'since') or '0')
local boosted, ahead, ahead_cost = 0, 0, 0
if starving then
  boosted = count[starving]
  for _, p in ipairs(prios) do
    if tonumber(p) > tonumber(starving) then
      ahead = ahead + count[p]
      ahead_cost = ahead_cost + tcost[p]
    end
  end
end
local gap = AGED_EVERY - 1
local first_gap = gap - since
local rank = redis.call('ZRANK', tier_key(tier), m)
local others = count[tier] - 1
local cost = 0
if others > 0 then cost = (tcost[tier] - tonumber(f[3])) * rank / others end
if not starving or tnum < tonumber(starving) then
  local position = rank
  for _, p in ipairs(prios) do
    if tonumber(p) > tnum then
      position = position + count[p]
      cost = cost + tcost[p]
    end
  end
  return {position, fmt(cost)}
end
if starving == tier then
  local passed = ahead
  if gap ~= 0 then passed = math.min(ahead, first_gap + rank * gap) end
  return {rank + passed, fmt(cost + ahead_cost * passed / math.max(ahead, 1))}
end
local above_n, above_cost = 0, 0
for _, p in ipairs(prios) do
  if tonumber(p) > tonumber(starving) and tonumber(p) > tnum then
    above_n = above_n + count[p]
    above_cost = above_cost + tcost[p]
  end
end
local position = rank + above_n
cost = cost + above_cost
local boosts
if gap == 0 then
  boosts = boosted
elseif position < first_gap then
  boosts = 0
else
  boosts = 1 + math.floor((position - first_gap) / gap)
end
boosts = math.min(boosted, boosts)
if boosted > 0 then cost = cost + tcost[starving] * boosts / boosted end
return {position + boosts, fmt(cost)}
""")

STATS = _script("""
release_due()
local tiers = {}
for _, p in ipairs(redis.call('ZRANGE', K_TIERS, 0, -1)) do
  tiers[#tiers + 1] = p
  tiers[#tiers + 1] = redis.call('ZCARD', tier_key(p))
end
return {
  tonumber(redis.call('HGET', K_COUNTS, 'queued') or '0'),
  redis.call('ZCARD', K_LEASES),
  tiers,
  redis.call('HGETALL', K_QUEUED_USERS),
}
""")

REROUTE = _script("""
-- 8 id, 9 new route, 10 its batch key: a queued job changes lines, keeping its tag
local jk = job_key(ARGV[8])
local f = redis.call('HMGET', jk, 'state', 'member', 'tier', 'backend', 'cost')
if f[1] ~= 'queued' or not f[2] or f[2] == '' then return 0 end
local old = route_key(f[3], f[4])
local score = redis.call('ZSCORE', old, f[2])
redis.call('ZREM', old, f[2])
redis.call('ZADD', route_key(f[3], ARGV[9]), score, f[2])
route_cost(f[4], -tonumber(f[5]))
route_cost(ARGV[9], tonumber(f[5]))
redis.call('HSET', jk, 'backend', ARGV[9], 'batch_key', ARGV[10])
return 1
""")

ANNOTATE = """
-- KEYS[1] the job's hash; ARGV field, value, ...: set only while the record exists
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


TIMINGS_RECORD = """
-- KEYS[1] the timings hash, KEYS[2] its version; ARGV[1] samples kept per field, then
-- (field, seconds) pairs: each field's JSON list gets the sample, trimmed to the last kept
local keep = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local listed = redis.call('HGET', KEYS[1], ARGV[i])
  local samples = {}
  if listed then samples = cjson.decode(listed) end
  samples[#samples + 1] = tonumber(ARGV[i + 1])
  while #samples > keep do table.remove(samples, 1) end
  redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(samples))
end
return redis.call('INCR', KEYS[2])
"""

TIMINGS_READ = """
-- KEYS as TIMINGS_RECORD; ARGV[1] the version the reader has ('' = none): nothing new
-- -> {version}; else {version, the whole hash}
local version = redis.call('GET', KEYS[2]) or '0'
if version == ARGV[1] then return {version} end
return {version, redis.call('HGETALL', KEYS[1])}
"""


ORDER = _script("""
-- 8 limit. FairQueue.order's inputs, read from one consistent snapshot: the aging state
-- and the first ``limit`` jobs of each tier, highest tier first:
-- {starving tier or '', since, tier, {id, route, batch key, ...}, tier, {...}, ...}
release_due()
local starving = age() or ''
local out = {starving, redis.call('HGET', K_SCHED, 'since') or '0'}
for _, tier in ipairs(redis.call('ZREVRANGE', K_TIERS, 0, -1)) do
  local rows = {}
  for _, m in ipairs(redis.call('ZRANGE', tier_key(tier), 0, tonumber(ARGV[8]) - 1)) do
    local id = id_of(m)
    local f = redis.call('HMGET', job_key(id), 'backend', 'batch_key')
    rows[#rows + 1] = id
    rows[#rows + 1] = f[1]
    rows[#rows + 1] = f[2] or ''
  end
  out[#out + 1] = tier
  out[#out + 1] = rows
end
return out
""")


LEAD = """
-- KEYS[1] the duty's key; ARGV[1] holder, ARGV[2] ttl ms: 1 if the holder has it now
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
