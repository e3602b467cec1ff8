-- Distributed locks on Redis (storage/redis_locks.py). Each block is one script.
-- KEYS[1] is the holder hash {owner, token, acquired_at} of a key, which expires
-- with the lock (PEXPIRE: Redis's own clock); KEYS[2] the key's token counter,
-- which never expires, so tokens only grow (as long as Redis keeps its data).

-- name: acquire
-- ARGV: owner, ttl in ms, acquired_at (caller's clock, epoch seconds).
if redis.call('EXISTS', KEYS[1]) == 1 then
    return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'acquired_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token

-- name: extend
-- ARGV: owner, token, ttl in ms. 1 when the caller still held the key.
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] == ARGV[1] and held[2] == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
end
return 0

-- name: release
-- ARGV: owner, token. 1 when the caller still held the key (now freed).
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] == ARGV[1] and held[2] == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0

-- name: check
-- ARGV: token. 1 when that token holds the key now.
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
    return 1
end
return 0

-- name: describe
-- The holder of each key in KEYS (owner, token, acquired_at, ms left) or, when
-- free, its last token from the counter named in ARGV at the same position.
local out = {}
for i, key in ipairs(KEYS) do
    local h = redis.call('HMGET', key, 'owner', 'token', 'acquired_at')
    if h[1] then
        out[i] = {h[1], h[2], h[3], redis.call('PTTL', key)}
    else
        out[i] = {false, redis.call('GET', ARGV[i]) or false, false, -2}
    end
end
return out
