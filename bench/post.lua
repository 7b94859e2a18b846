-- wrk script for the shardgate benchmark: replays pre-formatted requests.
--
--   wrk ... -s bench/post.lua URL -- REQUESTS_FILE
--
-- REQUESTS_FILE is written by the harness (bench/shapes.py: write_requests): every request is a
-- line with its length in bytes, then the request itself (head and body, exactly as sent).
-- They are the Ingress-shaped or the bare JSON POSTs, with `User-ID` (and, Ingress-shaped,
-- X-Request-ID, traceparent and the client address) differing between them, so that a hashing
-- proxy spreads the load over all shard groups and a per-key cache sees a realistic working set.
-- Everything is read once per thread, in init(); request() only hands out the next one: building
-- requests per call in Lua would cost wrk CPU that the proxy under test competes for.

local requests = {}
local count = 0
local index = 0
local next_thread = 0

function setup(thread)
   -- Start every wrk thread at a different point of the cycle.
   thread:set("offset", next_thread * 7919)
   next_thread = next_thread + 1
end

function init(args)
   local path = args[1]
   if not path then
      error("usage: wrk ... -s post.lua URL -- REQUESTS_FILE")
   end
   local file = assert(io.open(path, "rb"))
   local data = file:read("*a")
   file:close()
   local at = 1
   while at <= #data do
      local newline = string.find(data, "\n", at, true)
      local size = tonumber(string.sub(data, at, newline - 1))
      count = count + 1
      requests[count] = string.sub(data, newline + 1, newline + size)
      at = newline + size + 1
   end
   if count == 0 then
      error("no requests in " .. path)
   end
   index = (tonumber(offset) or 0) % count
end

function request()
   index = index % count + 1
   return requests[index]
end
