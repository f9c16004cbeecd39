"""The gateway's API, one router per area: the service (health, identity), jobs and their files, progress
events, the pool (workers, queue, models) and experiments. Each module's `router(door)` builds its routes
over the app's `Door` (`mochi_lab.gateway.door`); `mochi_lab.gateway.app` includes them under the prefix.
The web page and its sign-in are `mochi_lab.gateway.web`.
"""
