-- wrk script for the shardgate benchmark.
--
-- Every request is a small JSON POST carrying a `User-ID` header; the ids cycle through
-- `USERS` distinct values so that a hashing proxy spreads the load over all shard groups
-- (and a per-key cache, if any, sees a realistic working set rather than one hot key).
-- The requests are pre-formatted once per thread: building them per request in Lua would
-- cost wrk CPU that the proxy under test competes for on a small machine.

local USERS = 10000
local PATH = "/orders"
local BODY = '{"item":"book","qty":1,"note":"shardgate bench"}'

local requests = {}
local index = 0
local next_thread = 0

function setup(thread)
   -- Start every wrk thread at a different point of the id cycle.
   thread:set("offset", next_thread * 7919)
   next_thread = next_thread + 1
end

function init(args)
   for i = 1, USERS do
      local headers = {
         ["Content-Type"] = "application/json",
         ["User-ID"] = string.format("user-%05d", i),
      }
      requests[i] = wrk.format("POST", PATH, headers, BODY)
   end
   index = (tonumber(offset) or 0) % USERS
end

function request()
   index = index % USERS + 1
   return requests[index]
end
