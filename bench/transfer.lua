-- wrk script for the transfer measurements of the shardgate benchmark.
--
--   wrk ... -s bench/transfer.lua URL -- METHOD PATH BODY_BYTES
--
-- POST PATH 1048576: 1 MiB uploads; GET PATH 0: downloads (the size is the file's on the backend).
-- The `User-ID` header cycles over a few ids so that hashing proxies spread the requests over
-- the pods. The requests (bodies included) are formatted once per thread, in init(): building
-- a 1 MiB string per request would cost wrk the CPU that the proxy under test competes for.

local USERS = 16

local requests = {}
local index = 0

function init(args)
   local method = args[1] or "GET"
   local path = args[2] or "/"
   local size = tonumber(args[3]) or 0
   local body = nil
   if size > 0 then
      body = string.rep("x", size)
   end
   for i = 1, USERS do
      local headers = { ["User-ID"] = string.format("user-%05d", i) }
      if body then
         headers["Content-Type"] = "application/octet-stream"
      end
      requests[i] = wrk.format(method, path, headers, body)
   end
end

function request()
   index = index % USERS + 1
   return requests[index]
end
