package credentialbroker

import (
	"container/list"
	"crypto/sha256"
	"sync"
	"time"
)

// MinValidSeconds is the floor on how long a cached credential must stay valid to be served.
const MinValidSeconds = 30

const (
	defaultCacheEntries = 10000
	settleFor           = 2 * time.Second  // above the broker's read_cache_seconds (1 s default)
	tombstoneFor        = 65 * time.Second // the broker's read cache is at most 60 s
)

// dropOn: the event kinds after which the broker holds another token (or none).
var dropOn = map[string]bool{
	"CONNECTED": true, "REFRESHED": true, "RECOVERED": true, "NEEDS_REAUTH": true,
	"DISCONNECTED": true, "SCOPES_CHANGED": true, "UNSPECIFIED": true,
}

type cacheKey struct{ user, upstream string }

type cacheEntry struct {
	key        cacheKey
	credential *Credential
}

type ticket struct{ epoch, generation uint64 }

// credentialCache is the same cache as the Python SDK's: an LRU by (user, upstream), served
// only while the watch stream is live, with tickets against races, a settle window and digests
// of replaced tokens (so the broker's own read cache cannot re-seed a stale token).
type credentialCache struct {
	mu          sync.Mutex
	max         int
	order       *list.List
	entries     map[cacheKey]*list.Element
	generations map[cacheKey]uint64
	settling    map[cacheKey]time.Time
	tombstones  map[cacheKey]tombstone
	epoch       uint64
	live        bool
	hits        uint64
	now         func() time.Time
}

type tombstone struct {
	digest [32]byte
	until  time.Time
}

func newCache(max int) *credentialCache {
	if max < 1 {
		max = defaultCacheEntries
	}
	return &credentialCache{
		max: max, order: list.New(), entries: map[cacheKey]*list.Element{},
		generations: map[cacheKey]uint64{}, settling: map[cacheKey]time.Time{},
		tombstones: map[cacheKey]tombstone{}, now: time.Now,
	}
}

func (c *credentialCache) get(key cacheKey, minValid int, scopes []string) *Credential {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live {
		return nil
	}
	el, ok := c.entries[key]
	if !ok {
		return nil
	}
	cred := el.Value.(*cacheEntry).credential
	floor := max(minValid, MinValidSeconds)
	if !cred.ExpiresAt.IsZero() && cred.ExpiresAt.Sub(c.now()) < time.Duration(floor)*time.Second {
		return nil
	}
	if len(scopes) > 0 {
		held := make(map[string]bool, len(cred.Scopes))
		for _, s := range cred.Scopes {
			held[s] = true
		}
		for _, s := range scopes {
			if !held[s] {
				return nil
			}
		}
	}
	c.order.MoveToFront(el)
	c.hits++
	return cred
}

func (c *credentialCache) ticket(key cacheKey) ticket {
	c.mu.Lock()
	defer c.mu.Unlock()
	return ticket{c.epoch, c.generations[key]}
}

func (c *credentialCache) put(key cacheKey, cred *Credential, t ticket) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live || t.epoch != c.epoch || t.generation != c.generations[key] {
		return false
	}
	now := time.Now()
	if until, ok := c.settling[key]; ok {
		if until.After(now) {
			return false
		}
		delete(c.settling, key)
	}
	if tomb, ok := c.tombstones[key]; ok && tomb.until.After(now) && tomb.digest == sha256.Sum256([]byte(cred.AccessToken)) {
		return false
	}
	if el, ok := c.entries[key]; ok {
		el.Value.(*cacheEntry).credential = cred
		c.order.MoveToFront(el)
		return true
	}
	c.entries[key] = c.order.PushFront(&cacheEntry{key, cred})
	for c.order.Len() > c.max {
		last := c.order.Back()
		c.order.Remove(last)
		delete(c.entries, last.Value.(*cacheEntry).key)
	}
	return true
}

func (c *credentialCache) invalidate(key cacheKey, settle, tomb bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.generations[key]++
	now := time.Now()
	if el, ok := c.entries[key]; ok {
		if tomb {
			c.tombstones[key] = tombstone{sha256.Sum256([]byte(el.Value.(*cacheEntry).credential.AccessToken)), now.Add(tombstoneFor)}
		}
		c.order.Remove(el)
		delete(c.entries, key)
	}
	if settle {
		c.settling[key] = now.Add(settleFor)
	}
	if len(c.generations) > 4*c.max || len(c.settling) > 4*c.max || len(c.tombstones) > 4*c.max {
		c.generations = map[cacheKey]uint64{}
		c.epoch++ // outstanding tickets stay stale
		for k, until := range c.settling {
			if !until.After(now) {
				delete(c.settling, k)
			}
		}
		for k, t := range c.tombstones {
			if !t.until.After(now) {
				delete(c.tombstones, k)
			}
		}
	}
}

func (c *credentialCache) apply(e ConnectionEvent) {
	if dropOn[e.Kind] {
		c.invalidate(cacheKey{e.UserID, e.Upstream}, e.Kind != "CONNECTED", true)
	}
}

func (c *credentialCache) setLive(live bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.order.Init()
	c.entries = map[cacheKey]*list.Element{}
	c.generations = map[cacheKey]uint64{}
	c.epoch++
	c.live = live
}

// CacheStats describes the cache: its size, hits so far and whether its watch stream is live.
type CacheStats struct {
	Entries int
	Hits    uint64
	Live    bool
}

func (c *credentialCache) stats() CacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return CacheStats{c.order.Len(), c.hits, c.live}
}
