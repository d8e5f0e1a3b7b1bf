"""The overload and thermal benchmark (`meltguard bench`) and what it shares with the offline
simulator (`meltguard simulate`): the scenario, the capacity it is measured against, the
request arrivals and the way outcomes are summarised. Both produce the same `PointResult`,
which is what lets a test hold one against the other."""
