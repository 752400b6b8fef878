//! Sharing a fleet target among units by their headroom.

use super::UnitView;

/// Spread `target_w` (+ discharge) over the controllable units without a fixed target, in
/// proportion to each unit's room in the target's direction, so every battery moves the
/// same way (never one charging from another) and none leaves its `[lo, hi]` window.
pub fn share(units: &mut [UnitView], fixed: &[Option<f64>], target_w: f64) {
    let mut free_target = target_w;
    for (u, f) in units.iter_mut().zip(fixed) {
        if let (true, Some(f)) = (u.controllable, f) {
            u.battery_w = f.clamp(u.lo, u.hi);
            free_target -= u.battery_w;
        }
    }
    let free = |u: &UnitView, f: &Option<f64>| u.controllable && f.is_none();
    let room: f64 = units
        .iter()
        .zip(fixed)
        .filter(|(u, f)| free(u, f))
        .map(|(u, _)| {
            if free_target >= 0.0 {
                u.hi.max(0.0)
            } else {
                (-u.lo).max(0.0)
            }
        })
        .sum();
    for (u, f) in units.iter_mut().zip(fixed) {
        if !free(u, f) {
            continue;
        }
        let mine = if free_target >= 0.0 {
            u.hi.max(0.0)
        } else {
            (-u.lo).max(0.0)
        };
        let share = if room > 0.0 {
            free_target * mine / room
        } else {
            0.0
        };
        // Within the window; a window that excludes zero (forced charge) wins over the share.
        u.battery_w = share.clamp(u.lo.min(u.hi), u.hi.max(u.lo));
    }
}

/// Lower the AC output of `members` by up to `need_w` in total, taking from each in
/// proportion to `room(unit)` and applying it with `take(unit, watts)`. Returns what was taken.
pub fn reduce<R, T>(
    units: &mut [UnitView],
    members: &[usize],
    need_w: f64,
    room: R,
    mut take: T,
) -> f64
where
    R: Fn(&UnitView) -> f64,
    T: FnMut(&mut UnitView, f64),
{
    if need_w <= 0.0 {
        return 0.0;
    }
    let total: f64 = members.iter().map(|&k| room(&units[k]).max(0.0)).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let fraction = (need_w / total).min(1.0);
    let mut taken = 0.0;
    for &k in members {
        let x = room(&units[k]).max(0.0) * fraction;
        take(&mut units[k], x);
        taken += x;
    }
    taken
}
