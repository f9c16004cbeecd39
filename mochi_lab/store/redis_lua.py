"""The Redis store's Lua scripts, one constant each; every state change is one script, so it is atomic.

Each script is `LIB` (shared helpers; ARGV[1] is the key prefix) followed by its own body.
Key layout: see mochi_lab/store/redis.py.
"""

from mochi_lab.store.base import PROGRESS_LOG_KEEP_S

LIB = r"""
local P = ARGV[1]
local PLOG_KEEP = @PROGRESS_LOG_KEEP_S@
local function now_str()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
local function jkey(id) return P .. ':job:' .. id end
-- fields stored as JSON text or numbers: spliced into a doc as they are
local RAW = {params = 1, tags = 1, artifacts = 1, timings = 1, meta = 1, live = 1, step = 1, total_steps = 1, priority = 1,
             attempts = 1, fence = 1, seq = 1, created_at = 1, started_at = 1, finished_at = 1, lease_expires_at = 1}
-- the whole job as one JSON object: one bulk reply and one json.loads in Python, not 50 and 6
local function doc(k)
  local h, parts = redis.call('HGETALL', k), {}
  for i = 1, #h, 2 do
    local v = h[i + 1]
    if not RAW[h[i]] then v = cjson.encode(v) end
    parts[#parts + 1] = '"' .. h[i] .. '":' .. v
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
local function qkey(acc) return P .. ':q:' .. acc end
local function skey(acc, st) return P .. ':s:' .. acc .. ':' .. st end
-- the account's length keeps "a:b" + "c" and "a" + "b:c" apart
local function ekey(acc, exp) return P .. ':e:' .. string.len(acc) .. ':' .. acc .. ':' .. exp end
local function qmember(seq, id) return string.format('%016d', tonumber(seq)) .. ':' .. id end
local function move(id, acc, seq, old, new)
  redis.call('ZREM', skey(acc, old), id)
  redis.call('ZADD', skey(acc, new), seq, id)
end
local function push(id, acc, seq, prio)
  redis.call('ZADD', qkey(acc), -tonumber(prio), qmember(seq, id))
  if not redis.call('ZSCORE', P .. ':ready', acc) then
    redis.call('ZADD', P .. ':ready', redis.call('HGET', P .. ':lastclaim', acc) or 0, acc)
  end
end
local function unqueue(id, acc, seq)
  redis.call('ZREM', qkey(acc), qmember(seq, id))
  if redis.call('ZCARD', qkey(acc)) == 0 then redis.call('ZREM', P .. ':ready', acc) end
end
local function lkey(id) return P .. ':plog:' .. id end
local function pkey(id) return P .. ':preview:' .. id end
local function finish(k, id, acc, seq, old, st, now)
  redis.call('HSET', k, 'status', st, 'stage', st, 'finished_at', now)
  redis.call('EXPIRE', lkey(id), PLOG_KEEP)
  -- the video replaces a done job's preview; a cancelled or failed one keeps its last look
  if st == 'done' then redis.call('DEL', pkey(id)) end
  redis.call('HDEL', k, 'lease_expires_at')
  redis.call('ZREM', P .. ':leases', id)
  move(id, acc, seq, old, st)
end
-- a running job whose owner is gone: cancelled when a cancel waits (nobody is left to acknowledge
-- it), failed after its last allowed attempt, else queued again (the attempt stays counted)
local function take_back(id, now, maxatt)
  local k = jkey(id)
  redis.call('ZREM', P .. ':leases', id)
  local f = redis.call('HMGET', k, 'status', 'account', 'seq', 'priority', 'attempts', 'cancel_requested')
  if f[1] ~= 'running' then return end
  if f[6] == '1' then
    finish(k, id, f[2], f[3], 'running', 'cancelled', now)
  elseif tonumber(f[5]) >= maxatt then
    finish(k, id, f[2], f[3], 'running', 'failed', now)
    redis.call('HSET', k, 'error', 'worker lost ' .. f[5] .. ' times')
  else
    redis.call('HSET', k, 'status', 'queued', 'stage', 'queued')
    redis.call('HDEL', k, 'worker_id', 'lease_expires_at')
    move(id, f[2], f[3], 'running', 'queued')
    push(id, f[2], f[3], f[4])
  end
end
local function requeue_expired(now, limit, maxatt)
  local ids = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', '(' .. now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do take_back(id, now, maxatt) end
  return ids
end
-- nil when ARGV[3] (the token) owns the running job, else why not
local function lost(k, token)
  local f = redis.call('HMGET', k, 'status', 'fence')
  if not f[1] then return 'no longer exists' end
  if f[1] ~= 'running' or f[2] ~= token then
    return 'token ' .. token .. ' lost the lease (now ' .. f[1] .. ', token ' .. f[2] .. ')'
  end
  return nil
end
""".replace("@PROGRESS_LOG_KEEP_S@", str(PROGRESS_LOG_KEEP_S))

# ARGV: P, account, id, has key ('0'/'1'), idempotency key, priority, params JSON, tags JSON, has experiment, experiment,
# max active jobs ('' for none)
ENQUEUE = LIB + r"""
local acc, id, has_idem, idem, prio = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local k = jkey(id)
if has_idem == '1' then
  local old = redis.call('HGET', P .. ':idem:' .. acc, idem)
  if old and redis.call('EXISTS', jkey(old)) == 1 then return {'OLD', doc(jkey(old))} end
end
if ARGV[11] ~= '' then
  local active = redis.call('ZCARD', skey(acc, 'queued')) + redis.call('ZCARD', skey(acc, 'running'))
  if active >= tonumber(ARGV[11]) then return {'LIMIT', active} end
end
if has_idem == '1' then
  redis.call('HSET', P .. ':idem:' .. acc, idem, id)
  redis.call('HSET', k, 'idempotency_key', idem)
end
local seq, now = redis.call('INCR', P .. ':seq'), now_str()
if ARGV[9] == '1' then
  redis.call('HSET', k, 'experiment', ARGV[10])
  redis.call('ZADD', ekey(acc, ARGV[10]), seq, id)
end
redis.call('HSET', k, 'id', id, 'account', acc, 'priority', prio, 'params', ARGV[7], 'tags', ARGV[8],
           'created_at', now, 'seq', seq, 'status', 'queued', 'stage', 'queued', 'step', 0, 'total_steps', 0,
           'message', '', 'attempts', 0, 'fence', 0, 'cancel_requested', 0,
           'artifacts', '{}', 'timings', '{}', 'meta', '{}')
redis.call('ZADD', P .. ':h:' .. acc, seq, id)
redis.call('ZADD', skey(acc, 'queued'), seq, id)
push(id, acc, seq, prio)
return {'NEW', now}
"""

CLAIM = LIB + r"""
local worker, lease_s = ARGV[2], tonumber(ARGV[3])
local now = now_str()
requeue_expired(now, 100, tonumber(ARGV[4]))
for _ = 1, 1000 do
  local accs = redis.call('ZRANGE', P .. ':ready', 0, 0)
  if #accs == 0 then return false end
  local acc = accs[1]
  local popped = redis.call('ZPOPMIN', qkey(acc))
  if #popped == 0 then
    redis.call('ZREM', P .. ':ready', acc)
  else
    local id = string.sub(popped[1], 18)
    local k = jkey(id)
    local n = redis.call('INCR', P .. ':claimseq')
    redis.call('HSET', P .. ':lastclaim', acc, n)
    if redis.call('ZCARD', qkey(acc)) == 0 then redis.call('ZREM', P .. ':ready', acc)
    else redis.call('ZADD', P .. ':ready', n, acc) end
    if redis.call('HGET', k, 'status') == 'queued' then  -- else a stray entry: skip it
      local exp = string.format('%.6f', tonumber(now) + lease_s)
      redis.call('HINCRBY', k, 'fence', 1)
      redis.call('HINCRBY', k, 'attempts', 1)
      redis.call('HSET', k, 'status', 'running', 'stage', 'claimed', 'step', 0, 'message', '', 'live', '{}',
                 'worker_id', worker, 'lease_expires_at', exp)
      redis.call('HSETNX', k, 'started_at', now)
      move(id, acc, redis.call('HGET', k, 'seq'), 'queued', 'running')
      redis.call('ZADD', P .. ':leases', exp, id)
      return doc(k)
    end
  end
end
return false
"""

# ARGV: P, id, token, lease_s ('' keeps the lease), then field/value pairs to set
OWNER = LIB + r"""
local k, token = jkey(ARGV[2]), ARGV[3]
local why = lost(k, token)
if why then return {'LOST', why} end
if ARGV[4] ~= '' then
  local exp = string.format('%.6f', tonumber(now_str()) + tonumber(ARGV[4]))
  redis.call('HSET', k, 'lease_expires_at', exp)
  redis.call('ZADD', P .. ':leases', exp, ARGV[2])
end
if #ARGV > 4 then redis.call('HSET', k, unpack(ARGV, 5)) end
return {'OK', redis.call('HGET', k, 'cancel_requested')}
"""

# ARGV: P, id, token, log cap, then field/value pairs to set; the job as it stands is appended to its log
PROGRESS = LIB + r"""
local id, token = ARGV[2], ARGV[3]
local k = jkey(id)
local why = lost(k, token)
if why then return {'LOST', why} end
if #ARGV > 4 then redis.call('HSET', k, unpack(ARGV, 5)) end
if redis.call('LLEN', lkey(id)) < tonumber(ARGV[4]) then
  local f = redis.call('HMGET', k, 'stage', 'step', 'total_steps', 'message', 'attempts', 'live')
  local live = f[6] and f[6] ~= '{}' and cjson.decode(f[6]) or nil
  redis.call('RPUSH', lkey(id), cjson.encode({stage = f[1], step = tonumber(f[2]), total_steps = tonumber(f[3]),
                                              message = f[4] or '', attempts = tonumber(f[5]), live = live}))
end
return {'OK', redis.call('HGET', k, 'cancel_requested')}
"""

# ARGV: P, account, id, first index: the log from there, or false for another account's (or no) job
PROGRESS_SINCE = LIB + r"""
if redis.call('HGET', jkey(ARGV[3]), 'account') ~= ARGV[2] then return false end
return redis.call('LRANGE', lkey(ARGV[3]), ARGV[4], -1)
"""

# ARGV: P, id, token, step, image (base64)
PUT_PREVIEW = LIB + r"""
local why = lost(jkey(ARGV[2]), ARGV[3])
if why then return {'LOST', why} end
redis.call('HSET', pkey(ARGV[2]), 'step', ARGV[4], 'data', ARGV[5])
return {'OK', '0'}
"""

# ARGV: P, account, id: {step, image (base64)}, {} without one, or false for another account's (or no) job
GET_PREVIEW = LIB + r"""
if redis.call('HGET', jkey(ARGV[3]), 'account') ~= ARGV[2] then return false end
return redis.call('HMGET', pkey(ARGV[3]), 'step', 'data')
"""

# ARGV: P, id, token, final status, then field/value pairs to set
FINISH = LIB + r"""
local id, token = ARGV[2], ARGV[3]
local k = jkey(id)
local why = lost(k, token)
if why then return {'LOST', why} end
local f = redis.call('HMGET', k, 'account', 'seq')
finish(k, id, f[1], f[2], 'running', ARGV[4], now_str())
-- a cancel request that came too late lost the race: a done or failed job does not keep it
if ARGV[4] ~= 'cancelled' then redis.call('HSET', k, 'cancel_requested', 0) end
if #ARGV > 4 then redis.call('HSET', k, unpack(ARGV, 5)) end
return {'OK'}
"""

CANCEL = LIB + r"""
local acc, id = ARGV[2], ARGV[3]
local k = jkey(id)
local f = redis.call('HMGET', k, 'account', 'status', 'seq')
if f[1] ~= acc then return false end
if f[2] == 'queued' then
  unqueue(id, acc, f[3])
  redis.call('HSET', k, 'status', 'cancelled', 'stage', 'cancelled', 'finished_at', now_str())
  move(id, acc, f[3], 'queued', 'cancelled')
elseif f[2] == 'running' then
  redis.call('HSET', k, 'cancel_requested', '1')
end
return doc(k)
"""

# returns the artifacts JSON of the deleted job, false when the account has no such job
DELETE = LIB + r"""
local acc, id = ARGV[2], ARGV[3]
local k = jkey(id)
local f = redis.call('HMGET', k, 'account', 'status', 'seq', 'idempotency_key', 'artifacts', 'experiment')
if f[1] ~= acc then return false end
if f[2] == 'queued' then unqueue(id, acc, f[3]) end
if f[6] then redis.call('ZREM', ekey(acc, f[6]), id) end
redis.call('ZREM', P .. ':leases', id)
redis.call('ZREM', skey(acc, f[2]), id)
redis.call('ZREM', P .. ':h:' .. acc, id)
if f[4] and redis.call('HGET', P .. ':idem:' .. acc, f[4]) == id then
  redis.call('HDEL', P .. ':idem:' .. acc, f[4])
end
redis.call('DEL', k, lkey(id), pkey(id))
return f[5] or '{}'
"""

REQUEUE = LIB + r"""
local now = ARGV[3]
if now == '' then now = now_str() end
return requeue_expired(now, -1, tonumber(ARGV[2]))
"""

# ARGV: P, worker id, max attempts: take back every running job of that worker (it died or restarted)
RELEASE_WORKER = LIB + r"""
local worker, now, out = ARGV[2], now_str(), {}
for _, id in ipairs(redis.call('ZRANGE', P .. ':leases', 0, -1)) do
  local f = redis.call('HMGET', jkey(id), 'status', 'worker_id')
  if f[1] == 'running' and f[2] == worker then
    take_back(id, now, tonumber(ARGV[3]))
    out[#out + 1] = id
  end
end
return out
"""

# ARGV: P, index key, start, stop (ZREVRANGE), then the jobs as JSON docs joined into an array
PAGE = LIB + r"""
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', ARGV[2], ARGV[3], ARGV[4])) do
  if redis.call('EXISTS', jkey(id)) == 1 then out[#out + 1] = doc(jkey(id)) end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# ARGV: P, limit: per account with queued jobs, in turn order (the `ready` zset), the docs of its first
# `limit` queued jobs in its own order; Python interleaves them (base.claim_order)
QUEUED = LIB + r"""
local limit, out = tonumber(ARGV[2]), {}
for _, acc in ipairs(redis.call('ZRANGE', P .. ':ready', 0, limit - 1)) do
  local docs = {}
  for _, member in ipairs(redis.call('ZRANGE', qkey(acc), 0, limit - 1)) do
    local k = jkey(string.sub(member, 18))
    if redis.call('HGET', k, 'status') == 'queued' then docs[#docs + 1] = doc(k) end
  end
  out[#out + 1] = '[' .. table.concat(docs, ',') .. ']'
end
return '[' .. table.concat(out, ',') .. ']'
"""

# ARGV: P, account, id: the job's doc, or false when the account has no such job
GET = LIB + r"""
local k = jkey(ARGV[3])
if redis.call('HGET', k, 'account') ~= ARGV[2] then return false end
return doc(k)
"""

# ARGV: P, account, name, the record's JSON, the account's most experiments ('' none): nothing, or the count
# of its experiments when a new name would go past that
PUT_EXPERIMENT = LIB + r"""
local acc, name = ARGV[2], ARGV[3]
if ARGV[5] ~= '' and not redis.call('ZSCORE', P .. ':expo:' .. acc, name) then
  local count = redis.call('ZCARD', P .. ':expo:' .. acc)
  if count >= tonumber(ARGV[5]) then return count end
end
redis.call('HSET', P .. ':exp:' .. acc, name, ARGV[4])
redis.call('ZADD', P .. ':expo:' .. acc, 'NX', redis.call('INCR', P .. ':seq'), name)
"""

# ARGV: P. Flat list of account, model, status, count over the queues and the running jobs' leases.
QUEUE_DEPTH = LIB + r"""
local counts, order = {}, {}
local function add(acc, id, st)
  local ok, params = pcall(cjson.decode, redis.call('HGET', jkey(id), 'params') or '{}')
  local model = ok and type(params) == 'table' and type(params.model) == 'string' and params.model or '?'
  local key = acc .. '\0' .. model .. '\0' .. st
  if not counts[key] then counts[key] = 0; order[#order + 1] = {acc, model, st, key} end
  counts[key] = counts[key] + 1
end
for _, acc in ipairs(redis.call('ZRANGE', P .. ':ready', 0, -1)) do
  for _, m in ipairs(redis.call('ZRANGE', qkey(acc), 0, -1)) do add(acc, string.sub(m, 18), 'queued') end
end
for _, id in ipairs(redis.call('ZRANGE', P .. ':leases', 0, -1)) do
  local acc = redis.call('HGET', jkey(id), 'account')
  if acc then add(acc, id, 'running') end
end
local out = {}
for _, o in ipairs(order) do
  out[#out + 1] = o[1]; out[#out + 1] = o[2]; out[#out + 1] = o[3]; out[#out + 1] = counts[o[4]]
end
return out
"""

# ARGV: P, role, holder, ttl_s, take ('1' or '0'). 1 when holder now holds role, else 0.
LEAD = LIB + r"""
local k, t = P .. ':lead:' .. ARGV[2], redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local f = redis.call('HMGET', k, 'holder', 'until')
if ARGV[5] ~= '1' and f[1] and f[1] ~= ARGV[3] and tonumber(f[2]) > now then return 0 end
redis.call('HSET', k, 'holder', ARGV[3], 'until', string.format('%.3f', now + tonumber(ARGV[4])))
return 1
"""
