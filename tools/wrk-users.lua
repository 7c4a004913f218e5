-- wrk script for tools/compare: POST /v1/echo with a 64-byte body and a random user out of
-- 1000 in the x-moltbot-user header, so that sticky proxies spread the load like
-- moltbot-bench does.
local body = string.rep("x", 64)
request = function()
  local headers = {}
  headers["x-moltbot-user"] = "user-" .. math.random(1, 1000)
  headers["content-type"] = "application/octet-stream"
  return wrk.format("POST", "/v1/echo", headers, body)
end
